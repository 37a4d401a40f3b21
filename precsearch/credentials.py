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

# scheme://USER:SECRET@host -- USER may be empty. The secret runs to the LAST "@" before the
# query or fragment, so an unescaped "@" inside it (u:SEC@RET@host) is masked whole; it may hold
# "/" as SQLAlchemy reads it (u:pa/ss@host). When in doubt, mask more: a hidden host name costs
# nothing, a leaked password does.
_USERINFO = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*:)"  # scheme://user:
    r"(?P<secret>[^\s@]*(?:@[^\s?#]*)?)@"                  # secret, up to its host's "@"
)

# password=SECRET in a URL query (?password=, &PassWord=) or a libpq keyword string
# ("host=db password=SECRET"); a libpq value may be single-quoted and hold spaces.
_KEYWORD = re.compile(
    r"(?P<head>(?:password|passwd|pwd)\s*=\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'?|[^\s&#;]+)",
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
