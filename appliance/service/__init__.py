"""The appliance service: gRPC API, request pipeline stages, history, usage ledger. One module per job."""
