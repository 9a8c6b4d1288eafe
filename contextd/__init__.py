"""contextd: guests booted in isolated contexts on their cowfs roots (Linux-VServer's vserver)."""

__version__ = "0.1.0"
