"""Keep secrets out of what precsearch prints and writes: mask passwords in storage URLs.

>>> mask_credentials("cannot open postgresql://ann:s3cret@db:5432/optuna")
'cannot open postgresql://ann:***@db:5432/optuna'
>>> mask_credentials("host=db user=ann password=s3cret dbname=optuna")
'host=db user=ann password=*** dbname=optuna'
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"

# scheme://USER:SECRET@host -- USER may be empty. As in SQLAlchemy, the secret may hold anything
# but "@" and a line break: spaces and tabs too (u:pa ss@host), and "/" (u:pa/ss@host); it stops
# before another URL ("://"). An unescaped "@" inside it (u:SEC@RET@host) is masked whole: the
# secret runs to the last "@" before the query, the fragment or a space that follows its first "@".
# When in doubt, mask more: a hidden host name costs nothing, a leaked password does.
_USERINFO = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*:)"   # scheme://user:
    r"(?P<secret>(?:(?!://)[^\r\n@])*(?:@[^\s?#]*)?)@"   # secret, up to its host's "@"
)

# password=SECRET in a URL query (?password=, &PassWord=, sslpassword=), inside a libpq
# ``options=`` value, percent-encoded or not (options=-c%20password%3DSECRET), or in a libpq
# keyword string ("host=db password=SECRET"); a libpq value may be single-quoted and hold spaces.
# An unquoted secret may hold spaces and tabs too (a raw "?password=pa ss"): it runs on over the
# words that follow, up to the next keyword ("dbname=") or a quote, colon or bracket after a word.
# A mask already there ("password=***': ...") stays as it is.
_KEYWORD = re.compile(
    r"(?P<head>(?:password|passwd|pwd)\s*(?:=|%3D)\s*)"
    r"(?P<secret>\*\*\*(?=[\s&#;:'\"()]|$)"                        # a mask already there
    r"|'(?:[^'\\]|\\.)*'?"                                         # a quoted libpq value
    r"|[^\s&#;]+(?:[ \t]+[^\s&#;:='\"()]+(?=[\s&#;:'\"()]|$))*)",   # words up to the next keyword
    re.IGNORECASE,
)


def mask_credentials(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with every password it holds replaced by ``***``; user names stay visible.

    Works on a URL alone or on any message that contains URLs or libpq connection strings.
    ``known`` are secrets to hide wherever they appear, from :func:`credentials_in` of a URL whose
    driver may quote parts of it in its own words.
    """
    for secret in sorted(known, key=len, reverse=True):
        bare = secret.rstrip("@")  # a tail from credentials_in keeps its "@": so does the mask
        text = text.replace(secret, MASK + secret[len(bare):])
    text = _USERINFO.sub(rf"\g<head>{MASK}@", text)
    return _KEYWORD.sub(rf"\g<head>{MASK}", text)


def credentials_in(url: str) -> list[str]:
    """The secrets in ``url``, to mask in messages about it (see :func:`mask_credentials`).

    A driver that ends the password at its first "@" (SQLAlchemy does) takes the rest for the host
    and quotes it (``host 'RET@db'`` for ``u:SEC@RET@db``): each such tail, "@" included, is a
    secret too. Secrets shorter than 3 characters are left out: masking every "a" in a message
    would hide the message, not the password.
    """
    found = [match["secret"] for match in _USERINFO.finditer(url)]
    found += [match["secret"].strip("'") for match in _KEYWORD.finditer(url)]
    tails = [secret[at + 1:] + "@" for secret in found for at, char in enumerate(secret) if char == "@"]
    return [secret for secret in found + tails if len(secret.rstrip("@")) >= 3 and secret != MASK]
