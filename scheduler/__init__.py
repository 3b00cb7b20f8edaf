"""The scheduler: pure planning of which node serves which layers of which model."""
