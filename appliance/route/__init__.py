"""Routing: which requests go to the cloud. `features` (cheap signals), `classifier` (an embedding
classifier trained from labelled text), `router` (the decision before generation), `cascade` (the
confidence check after a local answer), `budget` (spend ceilings)."""
