from conftest import compose_config


def test_docker_compose_file_is_valid():
    res = compose_config()
    assert res.returncode == 0, res.stderr
    assert "prefect-server" in res.stdout and "dask-scheduler" in res.stdout
    assert "127.0.0.1" in res.stdout  # the UI is not exposed beyond this host
