"""The dual-call link every tier speaks: job registry and routes (server side),
create + stream + cancel (client side), the SSE event codec, relays,
heartbeats, and starting/serving role processes."""
