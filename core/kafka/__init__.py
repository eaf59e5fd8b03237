"""Kafka plumbing shared by every side: the local broker, client configs, topics."""
