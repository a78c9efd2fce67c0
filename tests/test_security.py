"""charrnn-serve's protections, attacked as a stranger or a web page would: real servers on loopback,
raw httpx and sockets, and the openai client. Each refused attack is shown to have generated nothing."""

import json
import socket
import time

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
import httpx  # noqa: E402
import openai  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import assert_one_line_error, charrnn_serve  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_serve import model  # noqa: E402, F401 - the fixture: the tiny GRU, else the shipped model

from charrnn_runtime.engine import Engine  # noqa: E402
from charrnn_serve import cli  # noqa: E402
from charrnn_serve.app import create_app  # noqa: E402
from charrnn_serve.security import SecurityOptions  # noqa: E402

FILE_KEY, ENV_KEY = "file-key-0123", "env-key-4567"
APP = "https://app.example"  # the page allowed to call the open server
BODY = {"prompt": "ROMEO: ", "max_tokens": 20}
MIB = 1 << 20


@pytest.fixture(scope="module")
def open_server(model):
    """charrnn-serve as most run it (no key, loopback) with one allowed origin."""
    with charrnn_serve("--model", str(model.path), "--allowed-origins", APP) as (_, url):
        yield url


@pytest.fixture(scope="module")
def keyed_server(model, tmp_path_factory):
    """Keys from a file and from $CHARRNN_API_KEY, and one more Host name."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# the team's key\n\n{FILE_KEY}\n")
    with charrnn_serve("--model", str(model.path), "--api-key-file", str(keys), "--allowed-hosts", "models.example",
                       env={"CHARRNN_API_KEY": ENV_KEY}) as (_, url):
        yield url


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def generation_counters(url):
    """The /metrics samples that move when a request reaches the engine."""
    text = httpx.get(f"{url}/metrics", headers=bearer(FILE_KEY)).text
    moving = ("charrnn_requests_total", "charrnn_prompt_chars_total", "charrnn_generated_chars_total")
    return [line for line in text.splitlines() if line.startswith(moving)]


def post(**options):
    """An attack: a POST /v1/completions through httpx."""
    def attack(url):
        response = httpx.post(f"{url}/v1/completions", timeout=10, **options)
        return response.status_code, response.headers, response.json()
    return attack


def preflight(origin):
    def attack(url):
        response = httpx.options(f"{url}/v1/completions", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        return response.status_code, response.headers, response.json() if response.content else None
    return attack


def raw(head, chunks=()):
    """An attack httpx would not send: a request written on a socket (`head` with {host} to fill in),
    then `chunks` of its body; the answer is read without sending the rest."""
    def attack(url):
        host = url.removeprefix("http://")
        address, port = host.rsplit(":", 1)
        with socket.create_connection((address, int(port)), timeout=10) as connection:
            connection.sendall(head.format(host=host).replace("\n", "\r\n").encode() + b"\r\n")
            for chunk in chunks:
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            answer = b""
            while data := connection.recv(65536):
                answer += data
        head_lines, _, content = answer.partition(b"\r\n\r\n")
        status, *header_lines = head_lines.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in header_lines)
        return int(status.split()[1]), headers, json.loads(content)
    return attack


JSON_POST = "POST /v1/completions HTTP/1.1\nHost: {host}\nContent-Type: application/json\n"
ATTACKS = {  # name: (server, attack, status, error code)
    "no key": ("keyed_server", post(json=BODY), 401, "invalid_api_key"),
    "wrong key": ("keyed_server", post(json=BODY, headers=bearer("guess")), 401, "invalid_api_key"),
    "key in another scheme": ("keyed_server", post(json=BODY, headers={"authorization": FILE_KEY}), 401,
                              "invalid_api_key"),
    "text/plain POST": ("open_server", post(content=json.dumps(BODY), headers={"content-type": "text/plain"}), 415,
                        "unsupported_media_type"),
    "form POST": ("open_server", post(data={"prompt": "x"}), 415, "unsupported_media_type"),
    "POST without a type": ("open_server", post(content=json.dumps(BODY)), 415, "unsupported_media_type"),
    "foreign Origin": ("open_server", post(json=BODY, headers={"origin": "https://evil.example"}), 403,
                       "origin_not_allowed"),
    "null Origin": ("open_server", post(json=BODY, headers={"origin": "null"}), 403, "origin_not_allowed"),
    "foreign Host (DNS rebinding)": ("open_server", post(json=BODY, headers={"host": "evil.example:8000"}), 403,
                                     "host_not_allowed"),
    "foreign Host with the key": ("keyed_server", post(json=BODY, headers={"host": "evil.example",
                                                                            **bearer(FILE_KEY)}), 403,
                                  "host_not_allowed"),
    "preflight from a foreign origin": ("open_server", preflight("https://evil.example"), 403, "origin_not_allowed"),
    "200 MB by Content-Length": ("open_server", raw(JSON_POST + "Content-Length: 200000000\n"), 413,
                                 "request_too_large"),
    # 1 MiB and a byte: the byte over ends what is sent (unread bytes would make the server's close a reset)
    "over 1 MiB chunked": ("open_server", raw(JSON_POST + "Transfer-Encoding: chunked\n", [b"x" * 65536] * 16 + [b"x"]),
                           413, "request_too_large"),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_an_attack_is_refused_before_anything_is_generated(name, request):
    server, attack, status, code = ATTACKS[name]
    url = request.getfixturevalue(server)
    before = generation_counters(url)
    started = time.monotonic()
    answer, headers, body = attack(url)
    assert time.monotonic() - started < 5  # nothing waited for (the 200 MB were never sent)
    assert (answer, body["error"]["code"], body["error"]["type"]) == (status, code, "invalid_request_error"), body
    assert headers["x-request-id"].startswith("req_") and "access-control-allow-origin" not in headers
    assert generation_counters(url) == before


def test_keys_from_the_file_and_the_environment_work_with_the_openai_client(keyed_server, model):
    before = generation_counters(keyed_server)
    for key in (FILE_KEY, ENV_KEY):
        client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == [model.path.name]
        completion = client.completions.create(model=model.path.name, prompt="", max_tokens=5, seed=1)
        assert len(completion.choices[0].text) == 5 and completion.usage.completion_tokens == 5
    assert generation_counters(keyed_server) != before  # what the attacks did not do
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="guess", max_retries=0).models.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"


def test_without_a_key_every_route_but_health_is_401_in_openai_shape(keyed_server):
    for path in ("/v1/models", "/metrics", "/docs", "/nowhere"):
        response = httpx.get(f"{keyed_server}{path}")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {"error": {"message": "no API key: send the header 'Authorization: Bearer <key>'",
                                             "type": "invalid_request_error", "param": None,
                                             "code": "invalid_api_key"}}
    assert httpx.get(f"{keyed_server}/health").json()["status"] == "ok"
    assert httpx.get(f"{keyed_server}/v1/models", headers={"authorization": f"bearer {ENV_KEY}"}).status_code == 200


def test_the_api_key_flag_takes_the_place_of_the_environment(model):
    with charrnn_serve("--model", str(model.path), "--api-key", "one-key", "--api-key", "two-key",
                       env={"CHARRNN_API_KEY": ENV_KEY}) as (_, url):
        answers = {key: httpx.get(f"{url}/v1/models", headers=bearer(key)).status_code
                   for key in ("one-key", "two-key", ENV_KEY)}
    assert answers == {"one-key": 200, "two-key": 200, ENV_KEY: 401}


@pytest.mark.parametrize("host, status", [
    ("localhost:8000", 200), ("LOCALHOST", 200), ("app.localhost", 200), ("127.0.0.1", 200), ("127.8.9.10:1", 200),
    ("[::1]:8000", 200), ("models.example:443", 200), ("evil.example", 403), ("127.0.0.1.nip.io", 403),
    ("models.example.evil.example", 403)])
def test_host_names_on_loopback(keyed_server, host, status):
    """Loopback names and addresses with any port, and --allowed-hosts, and nothing else."""
    assert httpx.get(f"{keyed_server}/v1/models", headers={"host": host, **bearer(FILE_KEY)}).status_code == status


def test_an_allowed_origin_gets_cors_headers_and_its_preflight_answered(open_server):
    status, headers, _ = preflight(APP)(open_server)
    assert status == 204 and headers["access-control-allow-origin"] == APP and headers["vary"] == "Origin"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type"
    response = httpx.post(f"{open_server}/v1/completions", json=BODY, headers={"origin": APP})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == APP
    assert "X-Request-Id" in response.headers["access-control-expose-headers"]
    own = httpx.post(f"{open_server}/v1/completions", json=BODY, headers={"origin": open_server})  # its own page
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers


@pytest.mark.parametrize("options, host, origin, status", [
    ({"bind_host": "0.0.0.0"}, "evil.example", None, 200),  # on every interface, Host is checked on request
    ({"bind_host": "0.0.0.0", "allowed_hosts": ("models.example",)}, "evil.example", None, 403),
    ({"bind_host": "0.0.0.0", "allowed_hosts": ("models.example",)}, "models.example:8000", None, 200),
    ({"bind_host": "::1"}, "evil.example", None, 403),
    ({"allowed_hosts": ("*",)}, "evil.example", None, 200),
    ({"allowed_origins": ("*",)}, "127.0.0.1", "https://anywhere.example", 200),
    ({}, "127.0.0.1:80", "http://127.0.0.1", 200),  # the default port is the same origin
    ({}, "127.0.0.1", "https://127.0.0.1", 403),  # another scheme is not
])
def test_what_the_options_let_through(model, options, host, origin, status):
    with TestClient(create_app(Engine(model), security=SecurityOptions(**options))) as client:
        headers = {"host": host, **({"origin": origin} if origin else {})}
        response = client.get("/v1/models", headers=headers)
    assert response.status_code == status
    assert response.headers.get("access-control-allow-origin") == (origin if "allowed_origins" in options else None)


def test_a_crash_is_logged_and_answered_500_with_a_request_id_only(model, caplog):
    app = create_app(Engine(model))

    @app.get("/v1/crash")
    async def crash():
        raise RuntimeError("secret: /home/someone/prompt.txt")

    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.get("/v1/crash")
    request_id = response.headers["x-request-id"]
    assert response.status_code == 500 and "secret" not in response.text
    assert response.json() == {"error": {"message": f"internal server error (request id {request_id})",
                                         "type": "server_error", "param": None, "code": None}}
    [record] = [r for r in caplog.records if r.name == "charrnn_serve"]
    assert request_id in record.getMessage() and "secret" in str(record.exc_info[1])


def test_bad_security_flags_are_one_line_errors(tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").write_text("# no keys yet\n\n")
    for args, fragment in [(["--api-key-file", str(tmp_path / "missing")], "cannot read"),
                           (["--api-key-file", str(tmp_path / "empty")], "has no keys"),
                           (["--api-key", "two words"], "printable ASCII without spaces"),
                           (["--allowed-origins", "app.example"], "not an origin"),
                           (["--allowed-origins", "https://app.example/path"], "not an origin"),
                           (["--allowed-hosts", "app.example:8000"], "without a port")]:
        assert_one_line_error(runner.invoke(cli.main, args), fragment)
