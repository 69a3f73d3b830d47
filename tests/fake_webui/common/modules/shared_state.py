import time


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    textinfo = None
    time_start = None

    def __init__(self):
        self.history = []  # test aid: (event, job)

    def interrupt(self):
        self.interrupted = True

    def begin(self, job="(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.history.append(("begin", job))

    def end(self):
        self.history.append(("end", self.job))
        self.job = ""
        self.job_count = 0
