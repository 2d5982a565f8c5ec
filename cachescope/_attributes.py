"""OpenTelemetry attribute keys used by cachescope (one place, so docs and code agree).

All keys are lowercase and dot-namespaced under ``cachescope.``; values are ints or short strings.
Token ids and tensor contents never become attributes.
"""

from __future__ import annotations

__all__ = [
    "CACHE", "OP", "QUEUE", "FAMILY", "OWNER", "PRODUCER", "SITE", "SEQ", "DEPTH", "BYTES_LOGICAL",
    "BYTES_STORAGE", "VIOLATION_KIND", "VIOLATION_COUNT", "VIOLATION_REPORT", "VIOLATION_HINT",
    "STEP", "STATE_PREV", "STATE_NEXT", "TOKENS", "OPS", "STEPS", "SEQ_LEN", "PROMPT_TOKENS",
    "MAX_NEW_TOKENS", "GENERATION_PREFIX", "SPAN_GENERATE", "SPAN_DECODE_STEP",
    "EVENT_VIOLATION", "MAX_STR_LEN", "MAX_REPORT_LEN",
]

# span and event names
SPAN_GENERATE = "generate"
SPAN_DECODE_STEP = "decode_step"
EVENT_VIOLATION = "cachescope.violation"

# every span
CACHE = "cachescope.cache"                  # InstrumentedCache name

# op events (event name = the op: push, pop, set, clear, clear_all)
OP = "cachescope.op"
QUEUE = "cachescope.queue"                  # queue name / key (truncated)
FAMILY = "cachescope.family"                # bounded family label (attn_kv)
OWNER = "cachescope.owner"                  # module that made the op
PRODUCER = "cachescope.producer"            # for pops: module that pushed the popped item
SITE = "cachescope.site"                    # call site file.py:123
SEQ = "cachescope.seq"                      # op number within the cache
DEPTH = "cachescope.depth"                  # queue length after the op
BYTES_LOGICAL = "cachescope.bytes.logical"  # sum of tensor nbytes of the value
BYTES_STORAGE = "cachescope.bytes.storage"  # distinct storage bytes of the value

# violations
VIOLATION_KIND = "cachescope.violation.kind"
VIOLATION_COUNT = "cachescope.violations"   # on decode_step: violations in the step
VIOLATION_REPORT = "cachescope.violation.report"
VIOLATION_HINT = "cachescope.violation.hint"

# decode_step spans
STEP = "cachescope.step"                    # step index
STATE_PREV = "cachescope.state.prev"        # state_ids[0] (omitted when None)
STATE_NEXT = "cachescope.state.next"        # state_ids[1]
TOKENS = "cachescope.tokens"                # tokens produced (step or whole generation)
OPS = "cachescope.ops"                      # cache ops in the step
OPS_DROPPED = "cachescope.ops_dropped"      # ops with no event: they left the timeline first

# generate spans
STEPS = "cachescope.steps"                  # decode steps in the generation
SEQ_LEN = "cachescope.seq_len"              # prompt + generated tokens
PROMPT_TOKENS = "cachescope.prompt_tokens"
MAX_NEW_TOKENS = "cachescope.max_new_tokens"
GENERATION_PREFIX = "cachescope.generation."  # other numeric keys of generation(**info)

MAX_STR_LEN = 256        # queue names, owners, sites, state ids
MAX_REPORT_LEN = 8192    # violation report text
