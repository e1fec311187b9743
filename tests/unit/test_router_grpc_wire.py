"""The router's own copy of the Open Inference Protocol's gRPC messages: fresh from its .proto, the same on the
wire as what tritonclient ships (hence Triton, KServe and MLServer), and read into the REST answer's shape."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import pytest
import tritonclient.grpc.service_pb2 as triton
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor
from grpc_tools import protoc

from shadowgate_router.oip import inference_pb2
from shadowgate_router.protocols import Extractor, grpc_answer_document

ROUTER = Path(__file__).resolve().parents[2] / "router"
PROTO = "shadowgate_router/oip/inference.proto"


def test_the_generated_module_is_fresh(tmp_path: Path) -> None:
    """`make protos` was run after the last change to inference.proto."""
    out = tmp_path / "descriptor.pb"
    assert protoc.main(["protoc", f"-I{ROUTER}", f"--descriptor_set_out={out}", str(ROUTER / PROTO)]) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _without_json_names(compiled.message_type)  # protoc adds them to descriptor sets, not to the module
    committed = descriptor_pb2.FileDescriptorProto()
    inference_pb2.DESCRIPTOR.CopyToProto(committed)
    assert committed == compiled, "run `make protos`"


def _without_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _without_json_names(message.nested_type)


def _fields(message: Descriptor) -> dict[int, tuple[str, int, bool, str | None]]:
    """number -> (name, type, repeated, message type's own fields' signature); nested types compared by shape."""
    found = {}
    for field in message.fields:
        nested = None
        if field.message_type is not None:
            nested = repr(sorted(_fields(field.message_type).items()))
        found[field.number] = (field.name, field.type, field.label == field.LABEL_REPEATED, nested)
    return found


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (inference_pb2.ModelInferRequest, triton.ModelInferRequest),
        (inference_pb2.ModelInferResponse, triton.ModelInferResponse),
        (inference_pb2.InferTensorContents, triton.InferTensorContents),
        (inference_pb2.InferParameter, triton.InferParameter),
    ],
)
def test_messages_match_tritonclient_s_field_for_field(ours: type, theirs: type) -> None:
    """Every field of ours exists in Triton's with the same number, name, type and nesting (Triton's may
    have more: unknown to the router, they pass through untouched)."""
    mine, reference = _fields(ours.DESCRIPTOR), _fields(theirs.DESCRIPTOR)
    for number, signature in mine.items():
        assert reference.get(number) == signature, f"{ours.DESCRIPTOR.name} field {number}"


@pytest.mark.parametrize(
    "theirs",
    [triton.ModelReadyRequest, triton.ModelMetadataRequest, triton.ModelConfigRequest, triton.ModelStatisticsRequest],
)
def test_named_model_requests_start_with_name_and_version(theirs: type) -> None:
    reference = _fields(theirs.DESCRIPTOR)
    for number, signature in _fields(inference_pb2.ModelRequest.DESCRIPTOR).items():
        assert reference[number] == signature


def test_rewriting_a_named_model_request_keeps_fields_it_does_not_know() -> None:
    request = triton.ModelStatisticsRequest(name="fraud", version="3")
    named = inference_pb2.ModelRequest.FromString(request.SerializeToString())
    named.name = "fraud-v2"
    again = triton.ModelStatisticsRequest.FromString(named.SerializeToString())
    assert (again.name, again.version) == ("fraud-v2", "3")
    infer = triton.ModelInferRequest(model_name="fraud", id="x")
    infer.parameters["sequence_id"].int64_param = 7  # Triton's sequence batching parameter
    ours = inference_pb2.ModelInferRequest.FromString(infer.SerializeToString())
    ours.model_name = "fraud-v2"
    back = triton.ModelInferRequest.FromString(ours.SerializeToString())
    assert (back.model_name, back.id, back.parameters["sequence_id"].int64_param) == ("fraud-v2", "x", 7)


def test_answers_read_from_typed_contents_and_raw_contents() -> None:
    typed = inference_pb2.ModelInferResponse(model_name="fraud", id="r-1")
    score = typed.outputs.add(name="score", datatype="FP32", shape=[2])
    score.contents.fp32_contents.extend([0.25, 0.5])
    label = typed.outputs.add(name="label", datatype="BYTES", shape=[1])
    label.contents.bytes_contents.append(b"0.125")
    typed.parameters["note"].string_param = "hi"
    document = grpc_answer_document(typed)
    assert document["outputs"][0]["data"] == [0.25, 0.5]
    assert document["outputs"][1]["data"] == ["0.125"]
    assert document["parameters"] == {"note": "hi"} and document["id"] == "r-1"
    assert Extractor("outputs[0].data[1]", "outputs[1].data[0]").read(document) == (0.5, 0.125)

    raw = inference_pb2.ModelInferResponse(model_name="fraud")
    raw.outputs.add(name="score", datatype="FP64", shape=[1])
    raw.outputs.add(name="flag", datatype="BOOL", shape=[1])
    raw.outputs.add(name="half", datatype="FP16", shape=[1])
    raw.raw_output_contents.extend([struct.pack("<d", -1.5), b"\x01", struct.pack("<e", 0.5)])
    document = grpc_answer_document(raw)
    assert [output["data"] for output in document["outputs"]] == [[-1.5], [True], [0.5]]
    assert Extractor("outputs[0].data[0]", "outputs[2].data[0]").read(document) == (-1.5, 0.5)


def test_huge_outputs_are_read_only_as_far_as_needed() -> None:
    answer = inference_pb2.ModelInferResponse()
    answer.outputs.add(name="big", datatype="INT64", shape=[100_000]).contents.int64_contents.extend(range(100_000))
    data = grpc_answer_document(answer)["outputs"][0]["data"]
    assert data[:3] == [0, 1, 2] and len(data) == 1024


@pytest.mark.parametrize(
    ("prediction", "confidence"),
    [
        ("outputs[0].data[0]", "outputs[1].data[0]"),
        ("outputs[0].data[1]", "outputs[2].data[0]"),
        ("outputs[1].data[0]", None),
        ("outputs[3].data[0]", "outputs[0].data[5]"),  # past the end: no prediction, no confidence
        ("outputs[0].name", "outputs[0].shape[0]"),  # not data: read from the whole document
        ("parameters.score", "id"),
        ("outputs[2].data[0]", "outputs[0].data"),  # a list is no number
    ],
)
def test_reading_a_grpc_answer_lazily_gives_what_the_whole_document_gives(
    prediction: str, confidence: str | None
) -> None:
    """Extractor.read_grpc builds only the outputs a path walks through; whatever the path, it reads what
    `read` reads from grpc_answer_document (the recorded rows stay the same)."""
    extract = Extractor(prediction, confidence)
    typed = inference_pb2.ModelInferResponse(model_name="fraud", id="7")
    typed.outputs.add(name="score", datatype="FP32", shape=[2]).contents.fp32_contents.extend([0.25, 0.5])
    typed.outputs.add(name="label", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"0.125")
    typed.outputs.add(name="flag", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    typed.parameters["score"].double_param = 0.75
    raw = inference_pb2.ModelInferResponse(model_name="fraud", id="8")
    raw.outputs.add(name="score", datatype="FP64", shape=[2])
    raw.outputs.add(name="label", datatype="BYTES", shape=[1])
    raw.outputs.add(name="flag", datatype="BOOL", shape=[1])
    raw.raw_output_contents.extend([struct.pack("<2d", -1.5, 2.5), struct.pack("<I", 3) + b"0.5", b"\x00"])
    partly_raw = inference_pb2.ModelInferResponse()  # fewer raw contents than outputs: the rest typed
    partly_raw.CopyFrom(typed)
    partly_raw.raw_output_contents.append(struct.pack("<2f", 1.0, 2.0))
    for answer in (typed, raw, partly_raw, inference_pb2.ModelInferResponse()):
        assert extract.read_grpc(answer) == extract.read(grpc_answer_document(answer))
