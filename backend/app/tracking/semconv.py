"""Span attribute and metric names of LLM calls, defined once.

The ``gen_ai.*``, ``openai.*``, ``server.*`` and ``error.type`` names are the OpenTelemetry
GenAI semantic conventions as of v1.41.1 (the last release of open-telemetry/semantic-conventions
that holds them); the ``llm.*`` names are this service's own (the seed's span attributes, kept).
Our cost is ``llm.cost_usd``: the conventions own ``gen_ai.*`` and define no cost attribute.
"""

# ruff: noqa: S105 - names of attributes and units, not credentials ("token" is an LLM token)

from __future__ import annotations

SEMCONV_VERSION = "1.41.1"

# -- the GenAI conventions ---------------------------------------------------------------------

GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
GEN_AI_REQUEST_PRESENCE_PENALTY = "gen_ai.request.presence_penalty"
GEN_AI_REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
GEN_AI_REQUEST_ENCODING_FORMATS = "gen_ai.request.encoding_formats"
GEN_AI_EMBEDDINGS_DIMENSION_COUNT = "gen_ai.embeddings.dimension.count"
GEN_AI_OUTPUT_TYPE = "gen_ai.output.type"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS = "gen_ai.usage.reasoning.output_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
GEN_AI_TOOL_DEFINITIONS = "gen_ai.tool.definitions"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
OPENAI_API_TYPE = "openai.api.type"
OPENAI_REQUEST_SERVICE_TIER = "openai.request.service_tier"
OPENAI_RESPONSE_SERVICE_TIER = "openai.response.service_tier"
OPENAI_RESPONSE_SYSTEM_FINGERPRINT = "openai.response.system_fingerprint"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"

# Deprecated names, emitted only with OTEL_GENAI_DEPRECATED_ATTRIBUTES=true (gen_ai.system,
# replaced by gen_ai.provider.name) or kept because our docs used them (gen_ai.usage.cost, never
# a convention: llm.cost_usd is the canonical cost attribute).
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_USAGE_COST = "gen_ai.usage.cost"

# Well-known values.
OPERATION_CHAT = "chat"
OPERATION_EMBEDDINGS = "embeddings"
API_TYPE_CHAT_COMPLETIONS = "chat_completions"
API_TYPE_RESPONSES = "responses"
OUTPUT_TYPE_TEXT = "text"
OUTPUT_TYPE_JSON = "json"
TOKEN_TYPE_INPUT = "input"
TOKEN_TYPE_OUTPUT = "output"

# -- ours: the seed's llm.* attributes -----------------------------------------------------------

LLM_MODEL = "llm.model"
LLM_REQUEST_ID = "llm.request_id"
LLM_STREAM = "llm.stream"
LLM_TASK_ID = "llm.task_id"
LLM_USER_ID = "llm.user_id"
LLM_AGENT = "llm.agent"
LLM_PROMPT_TOKENS = "llm.prompt_tokens"
LLM_COMPLETION_TOKENS = "llm.completion_tokens"
LLM_TOTAL_TOKENS = "llm.total_tokens"
LLM_CACHED_TOKENS = "llm.cached_tokens"
LLM_REASONING_TOKENS = "llm.reasoning_tokens"
LLM_COST_USD = "llm.cost_usd"
LLM_COST_STATUS = "llm.cost_status"
LLM_LATENCY_MS = "llm.latency_ms"
LLM_STATUS = "llm.status"
LLM_ATTEMPTS = "llm.attempts"
LLM_PARTIAL = "llm.partial"

# -- GenAI client metrics (gen-ai-metrics.md of v1.41.1) ------------------------------------------

METRIC_CLIENT_TOKEN_USAGE = "gen_ai.client.token.usage"
METRIC_CLIENT_OPERATION_DURATION = "gen_ai.client.operation.duration"
TOKEN_USAGE_UNIT = "{token}"
DURATION_UNIT = "s"
TOKEN_USAGE_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
