"""Sources turn bytes from devices and brokers into readings; see base.py for the contract."""
