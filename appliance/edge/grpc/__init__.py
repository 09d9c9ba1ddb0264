"""The gRPC face: the `appliance.v1.Appliance` service (server.py), its generated messages (proto.py)
and a small synchronous client (client.py)."""
