import pytest

from precsearch.runtime.credentials import credentials_in, mask_credentials
from precsearch.runtime.plan import mask_password

SECRET = "Hunter2x"


@pytest.mark.parametrize("text,masked", [
    (f"postgresql://ann:{SECRET}@db/optuna", "postgresql://ann:***@db/optuna"),
    (f"postgresql://:{SECRET}@db/optuna", "postgresql://:***@db/optuna"),
    (f"postgresql://ann:{SECRET}@x@db/optuna", "postgresql://ann:***@db/optuna"),
    (f"postgresql://ann:S@{SECRET}@db:5432/optuna", "postgresql://ann:***@db:5432/optuna"),
    (f"postgresql+psycopg://ann:pa/{SECRET}@db:5432/optuna?sslmode=require",
     "postgresql+psycopg://ann:***@db:5432/optuna?sslmode=require"),
    (f"mysql://ann:{SECRET}@db/optuna?x=a@b", "mysql://ann:***@db/optuna?x=a@b"),
    (f"postgresql://db/optuna?user=ann&password={SECRET}", "postgresql://db/optuna?user=ann&password=***"),
    (f"postgresql://db/optuna?PassWord={SECRET}&user=ann", "postgresql://db/optuna?PassWord=***&user=ann"),
    (f"postgresql://db/optuna?user=ann&PASSWORD={SECRET}#top", "postgresql://db/optuna?user=ann&PASSWORD=***#top"),
    (f"host=db user=ann password={SECRET} dbname=optuna", "host=db user=ann password=*** dbname=optuna"),
    (f"host=db user=ann password = '{SECRET} x' dbname=optuna",
     "host=db user=ann password = *** dbname=optuna"),
    (f"--storage 'postgresql://ann:{SECRET}@db/optuna': cannot open (OperationalError: refused)",
     "--storage 'postgresql://ann:***@db/optuna': cannot open (OperationalError: refused)"),
    (f"redis://ann:{SECRET}@cache:6379/0 and mysql://ann:{SECRET}@db/x (ask ann@example.org)",
     "redis://ann:***@cache:6379/0 and mysql://ann:***@db/x (ask ann@example.org)"),
    # spaces and tabs in a password, as SQLAlchemy reads them
    (f"postgresql://ann:pa ss{SECRET}@db/optuna", "postgresql://ann:***@db/optuna"),
    (f"postgresql://ann:{SECRET}\tx@db/optuna", "postgresql://ann:***@db/optuna"),
    (f"postgresql://ann: {SECRET} @db/optuna", "postgresql://ann:***@db/optuna"),
    (f"--storage 'postgresql://ann:a b{SECRET}@db/optuna': cannot open (OperationalError: refused)",
     "--storage 'postgresql://ann:***@db/optuna': cannot open (OperationalError: refused)"),
    (f"postgresql://db:5432/x and postgresql://ann:p q{SECRET}@db2/y",
     "postgresql://db:5432/x and postgresql://ann:***@db2/y"),
    (f"postgresql://db/optuna?user=ann&password=pa ss{SECRET}", "postgresql://db/optuna?user=ann&password=***"),
    (f"--storage 'postgresql://db/optuna?password=x\t{SECRET}': cannot open (refused)",
     "--storage 'postgresql://db/optuna?password=***': cannot open (refused)"),
    # libpq's options= and sslpassword=, percent-encoded or not
    (f"postgresql://db/optuna?user=ann&options=-c%20password%3D{SECRET}",
     "postgresql://db/optuna?user=ann&options=-c%20password%3D***"),
    (f"postgresql://db/optuna?options=-c password={SECRET}&user=ann",
     "postgresql://db/optuna?options=-c password=***&user=ann"),
    (f"postgresql://db/optuna?user=ann&sslpassword={SECRET}", "postgresql://db/optuna?user=ann&sslpassword=***"),
])
def test_every_credential_form_is_masked(text, masked):
    result = mask_credentials(text)
    assert result == masked
    assert SECRET not in result
    assert ("ann" in result) == ("ann" in text)  # the user name stays visible
    assert mask_credentials(result) == result  # masking twice changes nothing


@pytest.mark.parametrize("text", [
    "sqlite:///runs/study.db",
    "sqlite:////abs/path/with:colon@sign.db",
    "journal:///tmp/study.log",
    "postgresql://ann@db:5432/optuna",
    "postgresql://db:5432/optuna?sslmode=require",
    "trial 3 failed: out of memory",
])
def test_text_without_credentials_is_unchanged(text):
    assert mask_credentials(text) == text


def test_plan_mask_password_is_the_same_function():
    assert mask_password is mask_credentials


def test_known_secrets_hide_what_a_driver_quotes_back():
    url = f"postgresql://ann:S3C@{SECRET}@db/optuna?password=zzz9"
    assert credentials_in(url) == [f"S3C@{SECRET}", "zzz9", f"{SECRET}@"]
    # SQLAlchemy ends the password at its first "@" and takes the rest for the host name.
    message = f"--storage {url}: cannot open (failed to resolve host '{SECRET}@db')"
    masked = mask_credentials(message, known=credentials_in(url))
    assert SECRET not in masked and "zzz9" not in masked
    assert masked.endswith("(failed to resolve host '***@db')")
    assert credentials_in("postgresql://ann:ab@db/x") == []  # too short to mask everywhere


@pytest.mark.parametrize("url", [f"postgresql://ann:pa ss{SECRET}@db/optuna", f"postgresql://ann:{SECRET}\t1@db/x",
                                 f"postgresql://db/x?password=a b{SECRET}",
                                 f"postgresql://db/x?options=-c%20password%3D{SECRET}"])
def test_known_secrets_with_spaces_hide_what_a_driver_quotes_back(url):
    secret = credentials_in(url)[0]
    assert SECRET in secret and secret in url                      # the whole password, spaces included
    message = f"--storage {url}: cannot open (the server refused the password '{secret}')"
    masked = mask_credentials(message, known=credentials_in(url))
    assert SECRET not in masked and masked.endswith("(the server refused the password '***')")


def test_a_saved_plan_masks_a_password_with_spaces():
    from precsearch.runtime.plan import Plan

    text = Plan(search={"storage": f"postgresql://ann:pa ss\t{SECRET}@db/optuna"}).dumps()
    assert SECRET not in text and "postgresql://ann:***@db/optuna" in text
