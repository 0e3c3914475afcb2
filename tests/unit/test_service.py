"""HandlerService around real model.py files: warm-up, return-value and error mapping, batching,
and SageMaker-style modules."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from handlers.djl_api import Input, Output
from handlers.loader import HandlerLoadError
from handlers.service import HandlerService, error_output, is_out_of_memory
from serving.config import load_config

pytestmark = pytest.mark.usefixtures("isolated_imports")


def service_for(tmp_path: Path, source: str, properties: dict[str, str] | None = None) -> HandlerService:
    """Write model.py, load it through the real config + loader path, and initialise it."""
    (tmp_path / "model.py").write_text(textwrap.dedent(source), encoding="utf-8")
    config = load_config(str(tmp_path), {})
    props = config.handler_properties()
    props.update(properties or {})
    service = HandlerService(props, config.model_dir)
    service.initialize()
    return service


def request(body: bytes | str = b"{}", **properties: str) -> Input:
    item = Input()
    item.properties.update(properties)
    item.content.add("data", body.encode() if isinstance(body, str) else body)
    return item


def body_of(output: Output) -> bytes:
    assert output.content.size() == 1, output
    value = output.content.value_at(0)
    return value if isinstance(value, bytes) else str(value).encode()


def json_of(output: Output) -> object:
    return json.loads(body_of(output))


# ---- warm-up -------------------------------------------------------------------------------------


def test_warmup_call_gets_an_empty_input_with_the_init_properties(tmp_path: Path):
    (tmp_path / "serving.properties").write_text("option.model_id=tiny\nbatch_size=1\n")
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output
        CALLS = []

        def handle(inputs):
            CALLS.append({"empty": inputs.is_empty(), "props": dict(inputs.get_properties())})
            if inputs.is_empty():
                return None
            return Output().add_as_json(CALLS)
        """,
    )
    [output] = service.handle_batch([request("x")])
    calls = json_of(output)
    assert len(calls) == 2
    warmup, real = calls
    assert warmup["empty"] is True
    assert warmup["props"]["model_id"] == "tiny"
    assert warmup["props"]["batch_size"] == "1"
    assert warmup["props"]["model_dir"] == str(tmp_path.resolve())
    assert real["empty"] is False


def test_warmup_happens_once_in_initialize(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output
        COUNT = {"n": 0}

        def handle(inputs):
            COUNT["n"] += 1
            return None if inputs.is_empty() else Output().add(str(COUNT["n"]))
        """,
    )
    assert body_of(service.handle_batch([request()])[0]) == b"2"
    assert body_of(service.handle_batch([request()])[0]) == b"3"


def test_warmup_exception_fails_initialize(tmp_path: Path):
    (tmp_path / "model.py").write_text("def handle(inputs):\n    raise RuntimeError('cannot load weights')\n")
    service = HandlerService({}, str(tmp_path))
    with pytest.raises(RuntimeError, match="cannot load weights"):
        service.initialize()


def test_warmup_error_output_fails_initialize(tmp_path: Path):
    # Spec §2.1: on the init call, an Output with code >= 300 fails the model load.
    (tmp_path / "model.py").write_text(
        "from handlers.djl_api import Output\n"
        "def handle(inputs):\n"
        "    return Output().error('weights missing', code=500)\n"
    )
    service = HandlerService({}, str(tmp_path))
    with pytest.raises(Exception) as info:  # noqa: B017, PT011 - any load failure will do
        service.initialize()
    assert "weights missing" in str(info.value) or "500" in str(info.value)


def test_custom_handler_name(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output

        def handle(inputs):
            raise AssertionError("handle must not be called")

        def predict(inputs):
            return None if inputs.is_empty() else Output().add("predict")
        """,
        {"handler": "predict"},
    )
    assert body_of(service.handle_batch([request()])[0]) == b"predict"


def test_handle_batch_before_initialize_is_an_error(tmp_path: Path):
    service = HandlerService({}, str(tmp_path))
    with pytest.raises(AssertionError, match="initialize"):
        service.handle_batch([request()])


# ---- return values and errors --------------------------------------------------------------------


def test_echo_output_headers_and_body(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output

        def handle(inputs):
            if inputs.is_empty():
                return None
            return Output().add_property("X-Seen", inputs.get_property("x-mine")).add(inputs.get_as_string())
        """,
    )
    [output] = service.handle_batch([request("hello", **{"X-Mine": "v"})])
    assert output.code == 200
    assert output.get_property("X-Seen") == "v"
    assert body_of(output) == b"hello"


def test_none_becomes_204(tmp_path: Path):
    service = service_for(tmp_path, "def handle(inputs):\n    return None\n")
    [output] = service.handle_batch([request()])
    assert (output.code, output.message) == (204, "No content")
    assert output.content.size() == 0


def test_exception_becomes_424_djl_body(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        def handle(inputs):
            if inputs.is_empty():
                return None
            raise ValueError("bad prompt")
        """,
    )
    [output] = service.handle_batch([request()])
    assert (output.code, output.message) == (424, "invoke handler failure")
    assert output.get_property("content-type") == "application/json"
    assert json_of(output) == {"code": 424, "message": "invoke handler failure", "error": "bad prompt"}


def test_exception_without_message_names_its_type(tmp_path: Path):
    service = service_for(
        tmp_path,
        "def handle(inputs):\n    if not inputs.is_empty():\n        raise KeyError()\n",
    )
    [output] = service.handle_batch([request()])
    assert output.code == 424
    assert json_of(output)["error"] == "KeyError"


def test_exception_fails_every_request_of_the_batch(tmp_path: Path):
    service = service_for(
        tmp_path,
        "def handle(inputs):\n    if not inputs.is_empty():\n        raise RuntimeError('boom')\n",
    )
    outputs = service.handle_batch([request(), request(), request()])
    assert [o.code for o in outputs] == [424, 424, 424]
    assert all(json_of(o)["error"] == "boom" for o in outputs)


def test_memory_error_becomes_507(tmp_path: Path):
    service = service_for(
        tmp_path,
        "def handle(inputs):\n    if not inputs.is_empty():\n        raise MemoryError('KV cache')\n",
    )
    [output] = service.handle_batch([request()])
    assert output.code == 507
    assert json_of(output) == {"code": 507, "message": "out of memory", "error": "KV cache"}


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: out of memory",
        "CUDA out of memory. Tried to allocate",
        "No available memory for the cache blocks",
    ],
)
def test_out_of_memory_messages_become_507(tmp_path: Path, message: str):
    source = f"def handle(inputs):\n    if not inputs.is_empty():\n        raise RuntimeError({message!r})\n"
    service = service_for(tmp_path, source)
    [output] = service.handle_batch([request()])
    assert output.code == 507
    assert json_of(output)["error"] == message


def test_out_of_memory_error_class_name_is_recognised():
    class OutOfMemoryError(RuntimeError):  # noqa: N818 - the name torch uses
        pass

    assert is_out_of_memory(OutOfMemoryError("allocation failed"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("memory is fine"))
    assert error_output(MemoryError()).code == 507
    assert json.loads(body_of(error_output(MemoryError())))["error"] == "MemoryError"


def test_exception_with_status_code_keeps_it():
    class TooLong(Exception):
        status_code = 413

    output = error_output(TooLong("prompt too long"))
    assert output.code == 413
    assert json.loads(body_of(output)) == {"code": 413, "message": "TooLong", "error": "prompt too long"}


def test_non_output_return_becomes_424(tmp_path: Path):
    service = service_for(
        tmp_path,
        "def handle(inputs):\n    return None if inputs.is_empty() else 'plain string'\n",
    )
    [output] = service.handle_batch([request()])
    assert output.code == 424
    error = json_of(output)["error"]
    assert error.startswith("Invalid output type")
    assert "str" in error


def test_output_with_error_code_is_passed_through(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output

        def handle(inputs):
            return None if inputs.is_empty() else Output().error("nope", code=418, message="teapot")
        """,
    )
    [output] = service.handle_batch([request()])
    assert (output.code, output.message) == (418, "teapot")


# ---- dynamic batching ----------------------------------------------------------------------------


BATCH_ECHO = """
from handlers.djl_api import Output
SEEN = []

def handle(inputs):
    if inputs.is_empty():
        return None
    SEEN.append(inputs.get_batch_size())
    out = Output()
    batches = inputs.get_batches()
    for i, item in enumerate(batches[:KEEP]):
        out.add(item.get_as_string().upper(), key="data", batch_index=i)
        out.add_property(f"batch_{i}_X-Index", str(i))
    out.add_property("X-Batch-Size", str(len(batches)))
    return out

KEEP = 100
"""


def test_batched_output_is_split_per_request(tmp_path: Path):
    service = service_for(tmp_path, BATCH_ECHO)
    outputs = service.handle_batch([request("a"), request("b"), request("c")])
    assert [o.code for o in outputs] == [200, 200, 200]
    assert [body_of(o) for o in outputs] == [b"A", b"B", b"C"]
    assert [o.get_property("X-Index") for o in outputs] == ["0", "1", "2"]
    assert [o.get_property("X-Batch-Size") for o in outputs] == ["3", "3", "3"]


def test_single_request_is_not_wrapped_as_a_batch(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output

        def handle(inputs):
            if inputs.is_empty():
                return None
            return Output().add_as_json({"is_batch": inputs.is_batch(), "body": inputs.get_as_string()})
        """,
    )
    [output] = service.handle_batch([request("solo")])
    assert json_of(output) == {"is_batch": False, "body": "solo"}


def test_batch_output_size_mismatch_becomes_400(tmp_path: Path):
    service = service_for(tmp_path, BATCH_ECHO.replace("KEEP = 100", "KEEP = 2"))
    outputs = service.handle_batch([request("a"), request("b"), request("c")])
    assert len(outputs) == 3
    for output in outputs:
        assert output.code == 400
        assert json_of(output)["error"] == "Batch output size mismatch, expected: 3, actual: 2"


def test_batched_error_output_goes_to_every_request(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output

        def handle(inputs):
            return None if inputs.is_empty() else Output().error("all failed", code=500, message="x")
        """,
    )
    outputs = service.handle_batch([request("a"), request("b")])
    assert [o.code for o in outputs] == [500, 500]
    assert all(json_of(o)["error"] == "all failed" for o in outputs)
    outputs[0].add_property("X-Mutated", "1")
    assert outputs[1].get_property("X-Mutated") is None


def test_batched_none_is_204_for_every_request(tmp_path: Path):
    service = service_for(tmp_path, "def handle(inputs):\n    return None\n")
    outputs = service.handle_batch([request("a"), request("b")])
    assert [o.code for o in outputs] == [204, 204]


# ---- create_handler (batch-native handlers) ------------------------------------------------------


def test_create_handler_is_given_the_properties_and_batches(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output

        class Handler:
            def __init__(self, properties):
                self.properties = properties

            def handle_batch(self, inputs):
                return [Output().add(self.properties["greeting"] + i.get_as_string()) for i in inputs]

        def create_handler(properties):
            return Handler(properties)
        """,
        {"greeting": "hi "},
    )
    outputs = service.handle_batch([request("a"), request("b")])
    assert [body_of(o) for o in outputs] == [b"hi a", b"hi b"]


def test_create_handler_exception_fails_every_request(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        class Handler:
            def handle_batch(self, inputs):
                raise MemoryError("no room")

        def create_handler(properties):
            return Handler()
        """,
    )
    outputs = service.handle_batch([request("a"), request("b")])
    assert [o.code for o in outputs] == [507, 507]


def test_create_handler_miscount_still_gives_one_output_per_input(tmp_path: Path):
    # HandlerService.handle_batch promises "One Output per Input, whatever the handler does
    # (raise, return None, miscount)"; handlers/worker.py zips the result with strict=True.
    service = service_for(
        tmp_path,
        """
        from handlers.djl_api import Output

        class Handler:
            def handle_batch(self, inputs):
                return [Output().add("only one")]

        def create_handler(properties):
            return Handler()
        """,
    )
    outputs = service.handle_batch([request("a"), request("b"), request("c")])
    assert len(outputs) == 3


# ---- SageMaker-style modules ---------------------------------------------------------------------


def test_sagemaker_model_fn_input_predict_output(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        import json

        def model_fn(model_dir):
            return {"dir": model_dir, "scale": 10}

        def input_fn(request_body, content_type):
            assert content_type == "application/json"
            return json.loads(request_body)["x"]

        def predict_fn(data, model):
            return data * model["scale"]

        def output_fn(prediction, accept):
            return json.dumps({"y": prediction, "accept": accept}), "application/x-custom"
        """,
    )
    [output] = service.handle_batch([request('{"x": 4}', **{"Content-Type": "application/json"})])
    assert output.code == 200
    assert json_of(output) == {"y": 40, "accept": "application/json"}
    assert output.get_property("Content-Type") == "application/x-custom"


def test_sagemaker_model_fn_receives_the_model_dir(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        def model_fn(model_dir):
            return lambda data: {"model_dir": model_dir, "data": data}
        """,
    )
    [output] = service.handle_batch([request('{"a": 1}', **{"content-type": "application/json"})])
    assert json_of(output) == {"model_dir": str(tmp_path.resolve()), "data": {"a": 1}}
    assert output.get_property("Content-Type") == "application/json"


def test_sagemaker_transform_fn_alone(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        def model_fn(model_dir):
            return "m"

        def transform_fn(model, request_body, content_type, accept):
            return f"{model}:{request_body.decode()}:{content_type}:{accept}", "text/plain"
        """,
    )
    [output] = service.handle_batch([request("hi", **{"Content-Type": "text/plain", "Accept": "text/csv"})])
    assert body_of(output) == b"m:hi:text/plain:text/csv"
    assert output.get_property("Content-Type") == "text/plain"


def test_sagemaker_wildcard_accept_defaults_to_json(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        def model_fn(model_dir):
            return None

        def transform_fn(model, request_body, content_type, accept):
            return accept
        """,
    )
    [output] = service.handle_batch([request("x", Accept="*/*")])
    assert body_of(output) == b"application/json"


def test_sagemaker_batch_splits_per_request(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        def model_fn(model_dir):
            return lambda data: {"echo": data}
        """,
    )
    outputs = service.handle_batch(
        [
            request('{"i": 0}', **{"Content-Type": "application/json"}),
            request('{"i": 1}', **{"Content-Type": "application/json"}),
        ]
    )
    assert [json_of(o) for o in outputs] == [{"echo": {"i": 0}}, {"echo": {"i": 1}}]
    assert [o.get_property("Content-Type") for o in outputs] == ["application/json", "application/json"]


def test_sagemaker_predict_exception_becomes_424(tmp_path: Path):
    service = service_for(
        tmp_path,
        """
        def model_fn(model_dir):
            return None

        def predict_fn(data, model):
            raise RuntimeError("predict failed")
        """,
    )
    [output] = service.handle_batch([request("{}", **{"Content-Type": "application/json"})])
    assert output.code == 424
    assert json_of(output)["error"] == "predict failed"


def test_sagemaker_transform_fn_with_input_fn_is_rejected(tmp_path: Path):
    (tmp_path / "model.py").write_text(
        "def model_fn(model_dir):\n    return None\n"
        "def input_fn(body, content_type):\n    return body\n"
        "def transform_fn(model, body, content_type, accept):\n    return body\n"
    )
    service = HandlerService({}, str(tmp_path))
    with pytest.raises(ValueError, match="Cannot use transform_fn together with input_fn"):
        service.initialize()


def test_sagemaker_module_without_model_fn_is_rejected(tmp_path: Path):
    (tmp_path / "model.py").write_text("def predict_fn(data, model):\n    return data\n")
    service = HandlerService({}, str(tmp_path))
    with pytest.raises(ValueError, match=r"must define model_fn\(model_dir\)"):
        service.initialize()


def test_module_without_any_handler_is_rejected(tmp_path: Path):
    (tmp_path / "model.py").write_text("def helper():\n    return 1\n")
    service = HandlerService({}, str(tmp_path))
    with pytest.raises(HandlerLoadError) as info:
        service.initialize()
    message = str(info.value)
    assert "handle(inputs)" in message
    assert "model_fn" in message
    assert "def handle(inputs: Input) -> Output" in message


def test_custom_handler_name_missing_is_named_in_the_error(tmp_path: Path):
    (tmp_path / "model.py").write_text("def handle(inputs):\n    return None\n")
    service = HandlerService({"handler": "custom_fn"}, str(tmp_path))
    with pytest.raises(HandlerLoadError, match=r"custom_fn\(inputs\)"):
        service.initialize()
