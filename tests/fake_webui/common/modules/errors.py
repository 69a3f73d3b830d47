import traceback

reported = []


def report(message, exc_info=False):
    reported.append(message + ("\n" + traceback.format_exc() if exc_info else ""))


def display(e, task, **kwargs):
    reported.append(f"{task}: {e}")
