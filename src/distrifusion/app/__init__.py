"""The applications on top: the command line (`cli`, its torch-free argument checks `cli_checks`,
the local `launcher`), the server (`serve`, `serve_worker`) and the embedded pipelines (`pipelines`)."""
