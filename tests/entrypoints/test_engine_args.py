"""Engine flags shared by generate / eval / serve: parsing into LLM keyword arguments."""

import argparse

import pytest

from longctx.entrypoints.engine_args import add_engine_args, llm_kwargs


def parse(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p.parse_args(list(flags))


@pytest.mark.parametrize("value", ["auto", "fp8", "fp8_e4m3"])
def test_kv_cache_dtype_flag(value):
    assert llm_kwargs(parse("--kv-cache-dtype", value, "--no-sparse"))["kv_cache_dtype"] == value


def test_kv_cache_dtype_defaults_to_auto():
    assert llm_kwargs(parse("--no-sparse"))["kv_cache_dtype"] == "auto"


def test_kv_cache_dtype_flag_refuses_other_values(capsys):
    with pytest.raises(SystemExit):
        parse("--kv-cache-dtype", "int8")
    assert "int8" in capsys.readouterr().err


def test_pipeline_flags():
    kw = llm_kwargs(parse("--no-sparse"))
    assert (kw["pipeline_parallel_size"], kw["pipeline_chunking"]) == (1, "dcpp")
    flags = ("--pipeline-parallel-size", "2", "--pipeline-chunking", "fixed")
    kw = llm_kwargs(parse(*flags, "--pipeline-timeout", "60", "--no-sparse"))
    assert (kw["pipeline_parallel_size"], kw["pipeline_chunking"]) == (2, "fixed")
    assert kw["pipeline_timeout_s"] == 60.0


@pytest.mark.parametrize(
    "field,value",
    [("pipeline_parallel_size", 0), ("pipeline_chunking", "even"), ("pipeline_timeout_s", 0)],
)
def test_pipeline_settings_are_checked(field, value):
    from longctx.config import EngineConfig
    from longctx.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        EngineConfig(**{field: value})
