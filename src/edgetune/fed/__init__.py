"""Federated fine-tuning: typed updates, algorithms (transport-agnostic), aggregation,
device fleets and the in-process simulator. Flower code only packs and unpacks these."""
