from mim.cli import entry

entry()
