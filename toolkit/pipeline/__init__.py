"""The main-process side of a request (MAX's chapter 3): validate, tokenize, submit, stream, detokenize."""

from toolkit.pipeline.embed import EmbeddingsPipeline
from toolkit.pipeline.generate import RequestHandle, RequestStream, TokenGeneratorPipeline
from toolkit.pipeline.outputs import Completion, StreamChunk
from toolkit.pipeline.params import SamplingParams

__all__ = [
    "Completion", "EmbeddingsPipeline", "RequestHandle", "RequestStream", "SamplingParams", "StreamChunk",
    "TokenGeneratorPipeline",
]
