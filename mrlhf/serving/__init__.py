"""`mrlhf serve`: an OpenAI-compatible HTTP server on a training checkpoint, at its TP/PP layout.

Global rank 0 runs the HTTP front end (``server``) and drives the continuous-batching engine (``engine``); every
rank runs the engine's lockstep tick loop over its pipeline stage (``stage``). Requests are validated on rank 0
(``protocol``) before anything reaches another rank; text work (detokenization, stop strings, logprob strings)
stays on rank 0 (``text``, ``jobs``). See docs/serving.md.
"""
