"""Native PyTorch model families and checkpoint loading."""
