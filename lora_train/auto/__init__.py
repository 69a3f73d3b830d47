"""Auto mode: check -> caption -> settings -> train with validation -> choose the epoch -> publish -> grid -> report
(`pipeline.run_auto`; the epoch rule in `choose`, the report in `report`)."""
