"""The official `openai` Python package against a real prism-router and a real prism-node
(all-MiniLM-L6-v2), nothing mocked: the package is the client most users already have.

Setup (once):  bash scripts/install-client-deps.sh && make models
               cargo build --release -p prism-router -p prism-node --bins
Run:           .cache/venv-clients/bin/python -m pytest -q tests/clients/test_openai.py

The node and router come from conftest.py's `stack` fixture.
"""
import json
import urllib.error
import urllib.request

import openai
import pytest

from conftest import NODE, PIPELINE, cosine, node_embed, norm


SENT = []


@pytest.fixture(scope="module")
def client(stack):
    # max_retries=0: an error must show as the router sent it, not after the client's retries.
    # The hook records each request body, to show what the package really sends.
    def record(request):
        SENT.append(json.loads(request.content) if request.content else None)

    http = openai.DefaultHttpxClient(event_hooks={"request": [record]})
    return openai.OpenAI(base_url=stack["router"] + "/v1", api_key="unused-auth-is-off", max_retries=0,
                         http_client=http)


def test_embeds_a_string_with_the_packages_default_base64_encoding(client, stack):
    r = client.embeddings.create(model=PIPELINE, input="a red bicycle leaning on a wall")
    assert SENT[-1]["encoding_format"] == "base64", SENT[-1]
    assert r.object == "list" and r.model == PIPELINE
    assert len(r.data) == 1 and r.data[0].index == 0
    v = r.data[0].embedding
    assert len(v) == 384
    assert abs(norm(v) - 1.0) < 1e-5
    # Same vector as the node's own answer: the base64 float32 bytes decode exactly.
    ref = node_embed(stack, ["a red bicycle leaning on a wall"])
    assert cosine(v, ref["embeddings"][0]) > 0.999999
    # usage is the tokenizer's count ([CLS] a red bicycle leaning on a wall [SEP]), not words.
    assert r.usage.prompt_tokens == ref["prompt_tokens"] == 9
    assert r.usage.total_tokens == 9


def test_base64_and_float_encodings_carry_the_same_vectors(client):
    texts = ["first sentence", "second, longer sentence about routers", "3"]
    b = client.embeddings.create(model="text", input=texts)  # the package asks for base64
    f = client.embeddings.create(model="text", input=texts, encoding_format="float")
    assert [d.index for d in b.data] == [0, 1, 2]
    for x, y in zip(b.data, f.data):
        assert len(x.embedding) == len(y.embedding) == 384
        assert max(abs(p - q) for p, q in zip(x.embedding, y.embedding)) < 1e-6
    assert b.usage.prompt_tokens == f.usage.prompt_tokens > len(texts) * 2


def test_dimensions_truncates_and_renormalises(client):
    full = client.embeddings.create(model=PIPELINE, input="matryoshka", encoding_format="float").data[0].embedding
    short = client.embeddings.create(model=PIPELINE, input="matryoshka", dimensions=128).data[0].embedding
    assert len(short) == 128
    assert abs(norm(short) - 1.0) < 1e-5
    head = full[:128]
    expect = [x / norm(head) for x in head]
    assert max(abs(p - q) for p, q in zip(short, expect)) < 1e-5
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=PIPELINE, input="x", dimensions=4096)
    assert e.value.status_code == 400 and "384" in str(e.value)


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [PIPELINE, "text", NODE], ids
    m = client.models.retrieve(NODE)
    assert m.id == NODE and m.object == "model"
    # Every listed name embeds.
    for name in ids:
        assert len(client.embeddings.create(model=name, input="hi").data[0].embedding) == 384


def test_unknown_model_is_404_model_not_found_listing_the_valid_names(client):
    for name in ["text-embedding-3-small", "../../etc/passwd"]:
        with pytest.raises(openai.NotFoundError) as e:
            client.embeddings.create(model=name, input="x")
        err = e.value.body
        assert e.value.status_code == 404
        assert err["code"] == "model_not_found" and err["param"] == "model", err
        assert err["type"] == "invalid_request_error"
        assert f"{PIPELINE}, text, {NODE}" in err["message"], err
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_impossible_model_names_are_400_and_never_echoed_whole(client):
    for name in ["", "a\x00b", "a\r\nX-Injected: 1", "m" * 1_000_000]:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=name, input="x")
        assert e.value.status_code == 400
        assert e.value.body["param"] == "model"
        assert len(e.value.message) < 1000


def test_whitespace_only_text_embeds_and_keeps_its_batch(client, stack):
    r = client.embeddings.create(model=PIPELINE, input=["before", " ", "after", "\t\n "], encoding_format="float")
    assert len(r.data) == 4
    blank = r.data[1].embedding
    assert abs(norm(blank) - 1.0) < 1e-5
    # Both blanks are [CLS] [SEP], as sentence-transformers tokenises them.
    assert max(abs(p - q) for p, q in zip(blank, r.data[3].embedding)) < 1e-6
    assert node_embed(stack, [" "])["prompt_tokens"] == 2


def test_a_bad_item_is_named_by_its_index(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=PIPELINE, input=["fine", "also fine", ""])
    assert "input[2]" in e.value.message


def test_non_json_posts_are_refused_with_415(stack):
    # What a web page can send cross-site without a CORS preflight.
    for ctype in ["text/plain", "application/x-www-form-urlencoded"]:
        req = urllib.request.Request(stack["router"] + "/v1/embeddings", data=b'{"input": "x"}',
                                     headers={"content-type": ctype})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 415
        assert json.load(e.value)["error"]["type"] == "unsupported_media_type"
