"""The tab's four sections, one module each: dataset, settings, train, test (see `lora_train.ui.tab`)."""
