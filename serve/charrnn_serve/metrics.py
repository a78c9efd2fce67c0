"""The engine's metrics in Prometheus' text format; histogram names follow vLLM's
(vllm:time_to_first_token_seconds → charrnn_time_to_first_char_seconds, and so on)."""

PROMETHEUS = [  # (name, type, help, engine metric)
    ("charrnn_requests_total", "counter", "Finished requests by finish reason.", "requests_total"),
    ("charrnn_requests_rejected_total", "counter", "Requests refused (queue full or draining).",
     "requests_rejected_total"),
    ("charrnn_prompt_chars_total", "counter", "Prompt characters fed.", "prompt_chars_total"),
    ("charrnn_generated_chars_total", "counter", "Characters generated.", "generated_chars_total"),
    ("charrnn_active_rows", "gauge", "Requests generating in the batch now.", "active_rows"),
    ("charrnn_waiting_requests", "gauge", "Requests waiting for a row.", "waiting_requests"),
    ("charrnn_max_batch", "gauge", "Rows the batch can hold (all engines').", "max_batch"),
    ("charrnn_engines", "gauge", "Engines, each with its own batch.", "engines"),
    ("charrnn_step_seconds", "summary", "Time per batched step.", "step_seconds_sum"),
    ("charrnn_batch_rows", "summary", "Rows per batched step (the batch size).", "batch_rows_sum"),
    ("charrnn_request_queue_time_seconds", "histogram", "Time from submission to a row.",
     "request_queue_time_seconds"),
    ("charrnn_time_to_first_char_seconds", "histogram", "Time from submission to the first generated character.",
     "time_to_first_char_seconds"),
    ("charrnn_e2e_request_latency_seconds", "histogram", "Time from submission to the end of the request.",
     "e2e_request_latency_seconds"),
]


def prometheus(metrics):
    """The engine's metrics in Prometheus' text format (summaries count steps)."""
    lines = []
    for name, kind, help, key in PROMETHEUS:
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        value = metrics[key]
        if kind == "summary":
            lines += [f"{name}_sum {value}", f"{name}_count {metrics['steps_total']}"]
        elif kind == "histogram":
            lines += [f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {count}'
                      for bound, count in value["buckets"]]
            lines += [f"{name}_sum {value['sum']}", f"{name}_count {value['count']}"]
        elif isinstance(value, dict):
            lines += [f'{name}{{finish_reason="{reason}"}} {count}' for reason, count in sorted(value.items())]
        else:
            lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"
