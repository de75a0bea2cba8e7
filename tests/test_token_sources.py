"""End-to-end `jwt.token_sources` in a real Envoy (docs/policy.md, "Where the token comes from"):
a token from the query or a cookie is accepted and what the backend receives no longer carries
it (the echo upstream shows the path and Cookie header it got); a header without a scheme;
exactly one token per request across every place, in every spelling; the default reads
`Authorization` only; `without_ip` replay spends a token once, whichever place it came in."""

import json
import re
import time

import pytest

import jwtkit
from conftest import sha256_hex, start_envoy
from envoy_harness import compose, free_port, gateway, request

ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
KEY = "a-subscription-key"
MISSING = "Missing or malformed Authorization header"
REPLAY = "Token replay detected"
CHALLENGE = 'Bearer error="invalid_token"'
EVERY_PLACE = [{"header": "authorization", "scheme": "Bearer"}, {"query": "access_token"}, {"cookie": "access_token"}]

# Every token this module mints, to check that none reaches Envoy's log.
MINTED = []


@pytest.fixture(scope="module")
def key():
    return jwtkit.Key("ed", "ed-1")  # fast to sign: every test mints fresh tokens


def jwt(key, sources=None):
    block = {"issuers": [ISS], "audiences": [AUD], "algorithms": ["EdDSA"], "jwks": {"inline": jwtkit.jwks(key)}}
    if sources is not None:
        block["token_sources"] = sources
    return block


@pytest.fixture(scope="module")
def gw(request, key, echo_upstream):
    port, admin = free_port(), free_port()
    policy = {"apis": [
        {"name": "all", "path_prefix": "/all", "jwt": jwt(key, EVERY_PLACE)},
        {"name": "keyed", "path_prefix": "/keyed", "jwt": jwt(key, EVERY_PLACE),
         "subscription_key": {"query": "subscription-key", "keys_sha256": [sha256_hex(KEY)]}},
        {"name": "fwd", "path_prefix": "/fwd", "jwt": jwt(key, [{"cookie": "access_token", "forward": True}])},
        {"name": "custom", "path_prefix": "/custom", "jwt": jwt(key, [{"header": "X-JWT-Assertion"}])},
        {"name": "default", "path_prefix": "/default", "jwt": jwt(key)},
        {"name": "once", "path_prefix": "/once", "jwt": jwt(key, EVERY_PLACE), "replay": {"mode": "without_ip"}},
    ]}
    envoy = start_envoy(request, compose([gateway("gw", port, policy, echo_upstream)], admin))
    envoy.port = port
    return envoy


_count = [0]


def fresh(key):
    """A valid token never used before (its own jti: a new replay identity)."""
    _count[0] += 1
    t = jwtkit.token(key, jwtkit.claims(ISS, AUD, jti=f"ts-{_count[0]}-{time.time_ns()}"))
    MINTED.append(t)
    return t


def get(gw, path, headers=None):
    return request(gw.port, "GET", path, headers=headers)


def upstream_saw(r):
    """What the echo upstream received; the request must have been forwarded."""
    assert r.status == 200, r
    seen = r.json()
    assert seen["app"] == "demo-function-app", r
    return seen


def assert_no_token(seen, *tokens):
    text = json.dumps(seen)
    for t in tokens:
        # The signature alone is enough to find it, whatever was done to the rest.
        assert t.rsplit(".", 1)[1] not in text, f"the token reached the backend: {seen}"


def assert_missing(r):
    assert r.status == 401, r
    assert r.json() == {"statusCode": 401, "message": MISSING}, r
    assert r.header("www-authenticate") == CHALLENGE, r
    assert r.header("content-type") == "application/json", r


def pairs(path):
    """The query's pairs in order, whichever separator joins them."""
    query = path.partition("?")[2]
    return [p for p in re.split("[&;]", query) if p]


# --- a token in the query ---------------------------------------------------------------------

def test_query_token_accepted_and_removed_the_rest_kept_in_order(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, f"/all/orders?a=1&access_token={t}&b=2&c=x%26y"))
    assert seen["path"] == "/all/orders?a=1&b=2&c=x%26y"
    assert "authorization" not in seen["headers"]
    assert_no_token(seen, t)


def test_query_token_alone_leaves_no_query(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, f"/all/x?access_token={t}"))
    assert seen["path"] == "/all/x"
    assert_no_token(seen, t)


@pytest.mark.parametrize("spelling", ["ACCESS_TOKEN", "Access_Token", "access%5Ftoken", "%61ccess_token",
                                      "access.token", "access_token%5B%5D", "%20access_token"])
def test_query_token_in_another_spelling_accepted_and_removed(gw, key, spelling):
    # A backend reads these as `access_token` (docs/policy.md: the query token leaves in every
    # spelling, like the subscription key), so gateguard takes them as the token too.
    t = fresh(key)
    seen = upstream_saw(get(gw, f"/all/x?a=1&{spelling}={t}&b=2"))
    assert seen["path"] == "/all/x?a=1&b=2"
    assert_no_token(seen, t)


def test_query_token_behind_a_semicolon_removed(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, f"/all/x?a=1;access_token={t}&b=2"))
    assert pairs(seen["path"]) == ["a=1", "b=2"]
    assert_no_token(seen, t)


@pytest.mark.parametrize("query,kept", [
    ("a=1&subscription-key={k}&access_token={t}&b=2", "a=1&b=2"),
    ("access_token={t}&a=1&Subscription-Key={k}", "a=1"),
    ("subscription-key={k}&access_token={t}", ""),
])
def test_query_token_and_subscription_key_both_leave_the_query(gw, key, query, kept):
    t = fresh(key)
    seen = upstream_saw(get(gw, "/keyed/x?" + query.format(k=KEY, t=t)))
    assert seen["path"] == ("/keyed/x?" + kept if kept else "/keyed/x")
    assert_no_token(seen, t)
    assert KEY not in json.dumps(seen)


def test_query_token_with_the_key_in_its_header(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, f"/keyed/x?a=1&access_token={t}", {"Ocp-Apim-Subscription-Key": KEY}))
    assert seen["path"] == "/keyed/x?a=1"
    assert "ocp-apim-subscription-key" not in seen["headers"]
    assert_no_token(seen, t)


# --- a token in a cookie ----------------------------------------------------------------------

def test_cookie_token_accepted_and_removed_other_cookies_kept(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, "/all/x?a=1", {"Cookie": f"theme=dark; access_token={t}; lang=en"}))
    assert seen["headers"]["cookie"] == ["theme=dark; lang=en"]
    assert seen["path"] == "/all/x?a=1"
    assert_no_token(seen, t)


def test_cookie_token_alone_leaves_no_cookie_header(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, "/all/x", {"Cookie": f"access_token={t}"}))
    assert "cookie" not in seen["headers"]
    assert_no_token(seen, t)


def test_quoted_cookie_token_accepted_and_removed(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, "/all/x", {"Cookie": f'access_token="{t}"; theme=dark'}))
    assert seen["headers"]["cookie"] == ["theme=dark"]
    assert_no_token(seen, t)


def test_cookie_token_in_a_second_cookie_header_removed(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, "/all/x", [("Cookie", "theme=dark"), ("Cookie", f"access_token={t}; lang=en")]))
    cookies = [c.strip() for v in seen["headers"]["cookie"] for c in v.split(";")]
    assert sorted(cookies) == ["lang=en", "theme=dark"]
    assert_no_token(seen, t)


def test_forwarded_cookie_token_stays(gw, key):
    t = fresh(key)
    cookie = f"theme=dark; access_token={t}; lang=en"
    seen = upstream_saw(get(gw, "/fwd/x", {"Cookie": cookie}))
    assert seen["headers"]["cookie"] == [cookie]


def test_other_scheme_in_authorization_is_not_a_token(gw, key):
    # `Authorization: Basic ...` next to a cookie token: one token, and the header stays.
    t = fresh(key)
    seen = upstream_saw(get(gw, "/all/x", {"Authorization": "Basic dXNlcjpwdw==", "Cookie": f"access_token={t}"}))
    assert seen["headers"]["authorization"] == ["Basic dXNlcjpwdw=="]
    assert "cookie" not in seen["headers"]


# --- a header without a scheme ----------------------------------------------------------------

def test_custom_header_without_scheme(gw, key):
    t = fresh(key)
    seen = upstream_saw(get(gw, "/custom/x", {"X-JWT-Assertion": t}))
    # A header token stays, as Authorization always has.
    assert seen["headers"]["x-jwt-assertion"] == [t]


def test_custom_header_only(gw, key):
    t = fresh(key)
    # The whole value is the token: a scheme in front makes it two words.
    assert_missing(get(gw, "/custom/x", {"X-JWT-Assertion": f"Bearer {t}"}))
    # Authorization is not a place this API lists.
    assert_missing(get(gw, "/custom/x", {"Authorization": f"Bearer {t}"}))
    assert_missing(get(gw, f"/custom/x?access_token={t}"))


def test_custom_header_with_underscores_never_reaches_the_backend(gw, key):
    # A CGI-style backend reads x_jwt_assertion as X-JWT-Assertion: rendered Envoy drops it, so
    # the backend only ever sees the header gateguard checked.
    t, forged = fresh(key), fresh(key)
    seen = upstream_saw(get(gw, "/custom/x", {"X-JWT-Assertion": t, "x_jwt_assertion": forged}))
    assert seen["headers"]["x-jwt-assertion"] == [t]
    assert "x_jwt_assertion" not in seen["headers"]
    assert_no_token(seen, forged)


# --- exactly one token ------------------------------------------------------------------------

TWO_TOKENS = {
    "header+query": ("/all/x?access_token={b}", {"Authorization": "Bearer {a}"}),
    "header+cookie": ("/all/x", {"Authorization": "Bearer {a}", "Cookie": "access_token={b}"}),
    "query+cookie": ("/all/x?access_token={a}", {"Cookie": "access_token={b}"}),
    "same token in query and cookie": ("/all/x?access_token={a}", {"Cookie": "access_token={a}"}),
    "same token in header and query": ("/all/x?access_token={a}", {"Authorization": "Bearer {a}"}),
    "query twice": ("/all/x?access_token={a}&access_token={b}", {}),
    "query twice, same value": ("/all/x?access_token={a}&access_token={a}", {}),
    "query ACCESS_TOKEN": ("/all/x?access_token={a}&ACCESS_TOKEN={b}", {}),
    "query access%5Ftoken": ("/all/x?access_token={a}&access%5Ftoken={b}", {}),
    "query access.token": ("/all/x?access.token={a}&access_token={b}", {}),
    "query access_token[]": ("/all/x?access_token%5B%5D={a}&access_token={b}", {}),
    "query behind ;": ("/all/x?access_token={a};access_token={b}", {}),
    "cookie twice": ("/all/x", {"Cookie": "access_token={a}; access_token={b}"}),
    "cookie twice, two headers": ("/all/x", [("Cookie", "access_token={a}"), ("Cookie", "access_token={b}")]),
    "authorization twice": ("/all/x", [("Authorization", "Bearer {a}"), ("Authorization", "Bearer {b}")]),
    "custom header twice": ("/custom/x", [("X-JWT-Assertion", "{a}"), ("X-JWT-Assertion", "{b}")]),
    "forwarded cookie twice": ("/fwd/x", {"Cookie": "access_token={a}; access_token={b}"}),
}


@pytest.mark.parametrize("case", TWO_TOKENS)
def test_two_tokens_refused(gw, key, case):
    a, b = fresh(key), fresh(key)  # both valid: the count is what refuses
    path, headers = TWO_TOKENS[case]
    items = headers if isinstance(headers, list) else list(headers.items())
    assert_missing(get(gw, path.format(a=a, b=b), [(n, v.format(a=a, b=b)) for n, v in items]))


# ASP.NET Core (Azure Functions) reads cookie names ignoring case and PHP reads `.` as `_`: with
# `access_token=<valid>; ACCESS_TOKEN=<anything>` a gateway matching names exactly would verify the
# first and forward the second, unverified, under a name the backend reads as `access_token`.
@pytest.mark.parametrize("api,cookie", [
    ("all", "access_token={a}; ACCESS_TOKEN={b}"),
    ("all", "Access_Token={b}; access_token={a}"),
    ("all", "access_token={a}; access.token={b}"),
    ("fwd", "access_token={a}; ACCESS_TOKEN={b}"),
])
def test_two_tokens_in_cookie_spellings_a_backend_reads_as_one_refused(gw, key, api, cookie):
    a, b = fresh(key), fresh(key)
    assert_missing(get(gw, f"/{api}/x", {"Cookie": cookie.format(a=a, b=b)}))


@pytest.mark.parametrize("path,headers", [
    ("/all/x?access_token=", {}),
    ("/all/x?access_token", {}),
    ("/all/x?access_token=&a=1", {"Authorization": "Bearer {a}"}),
    ("/all/x", {"Authorization": "Bearer {a}", "Cookie": "access_token="}),
    ("/all/x?access_token={a}%20{a}", {}),
    ("/all/x", {"Cookie": "access_token={a},{a}"}),
])
def test_empty_or_malformed_token_refused_even_next_to_a_good_one(gw, key, path, headers):
    a = fresh(key)
    assert_missing(get(gw, path.format(a=a), {n: v.format(a=a) for n, v in headers.items()}))


# --- the default reads Authorization only -----------------------------------------------------

def test_default_ignores_query_and_cookie_tokens(gw, key):
    t = fresh(key)
    assert_missing(get(gw, f"/default/x?access_token={t}"))
    assert_missing(get(gw, "/default/x", {"Cookie": f"access_token={t}"}))
    assert_missing(get(gw, f"/default/x?ACCESS_TOKEN={t}", {"Cookie": f"access_token={t}"}))


def test_default_leaves_query_and_cookie_to_the_backend(gw, key):
    # Not tokens here, so not the gateway's to remove: the backend gets them as sent.
    t = fresh(key)
    seen = upstream_saw(get(gw, "/default/x?access_token=other&a=1",
                            {"Authorization": f"Bearer {t}", "Cookie": "access_token=other; theme=dark"}))
    assert seen["path"] == "/default/x?access_token=other&a=1"
    assert seen["headers"]["cookie"] == ["access_token=other; theme=dark"]
    assert seen["headers"]["authorization"] == [f"Bearer {t}"]


# --- replay: one token, whichever place -------------------------------------------------------

def assert_replay(r):
    assert r.status == 401, r
    assert r.json() == {"statusCode": 401, "message": REPLAY}, r


def test_without_ip_spends_a_token_once_whichever_place(gw, key):
    t = fresh(key)
    upstream_saw(get(gw, f"/once/x?access_token={t}"))
    assert_replay(get(gw, "/once/x", {"Authorization": f"Bearer {t}"}))
    assert_replay(get(gw, "/once/x", {"Cookie": f"access_token={t}"}))
    assert_replay(get(gw, f"/once/x?Access%5FToken={t}"))
    u = fresh(key)
    upstream_saw(get(gw, "/once/x", {"Cookie": f"theme=dark; access_token={u}"}))
    assert_replay(get(gw, f"/once/x?access_token={u}"))
    assert_replay(get(gw, "/once/x", {"Authorization": f"bearer {u}"}))


def test_a_refused_two_token_request_spends_nothing(gw, key):
    t = fresh(key)
    assert_missing(get(gw, f"/once/x?access_token={t}", {"Authorization": f"Bearer {t}"}))
    assert_missing(get(gw, "/once/x", {"Cookie": f"access_token={t}; access_token={t}"}))
    upstream_saw(get(gw, "/once/x", {"Cookie": f"access_token={t}"}))
    assert_replay(get(gw, "/once/x", {"Authorization": f"Bearer {t}"}))


# --- last: nothing above wrote a token to the log ---------------------------------------------

def test_no_token_in_envoy_log(gw):
    log = gw.log_text()
    assert "refused" in log  # the audit lines are there...
    leaked = [t for t in MINTED if t.rsplit(".", 1)[1] in log]
    assert not leaked, f"{len(leaked)} tokens in the Envoy log"  # ...without a token
