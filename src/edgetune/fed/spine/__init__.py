"""FedSpine: federated prune-and-tune with per-device bandits."""
