"""The command line (`appliance ...`): one module per sub-command, registered in `main.py`. The top layer."""
