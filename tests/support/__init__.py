"""Helpers every test tier shares (fixtures live in tests/conftest.py and use these).

processes.py   `Service`: one `adaptloop` service process a test runs (start, wait ready, kill, stop, log);
               `wait_until`, `run_cli`, `stop_processes`, `JAR_CACHE`
kafka.py       `read_topic`: every record of a topic as of now (read to the end offsets captured at the start)
handles.py     `WorkerHandle`, `TrainerHandle`, `ApiHandle`: a service plus the topics and helpers its tests use
events.py      valid input events (`event`) and the counts they must give (`ground_truth`)
adapters.py    adapters and datasets for trainer tests: `fake_adapter`, `random_adapter`, `write_facts`
prometheus.py  `check_metric_names`: the project's metric conventions
"""
