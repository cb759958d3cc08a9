"""The queen's client APIs, one module a job: what a request may ask (``requests``), which model
names the fleet answers to (``models``), the job's events as an answer (``streams``), and one
module per dialect that only translates (``openai``, ``ollama``). Both dialects build the same
job request and read the same event stream; neither knows how the fleet runs it."""
