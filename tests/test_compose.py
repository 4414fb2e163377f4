from conftest import compose_config


def test_docker_compose_file_is_valid():
    res = compose_config()
    assert res.returncode == 0, res.stderr
    assert "prefect-server" in res.stdout and "dask-scheduler" in res.stdout
    assert "127.0.0.1" in res.stdout  # the UI is not exposed beyond this host


def test_gpu_profile_reserves_the_gpus_and_builds_the_gpu_image():
    res = compose_config(profiles="gpu")
    assert res.returncode == 0, res.stderr
    import yaml

    service = yaml.safe_load(res.stdout)["services"]["gpu-worker"]
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert service["build"]["args"]["EXTRAS"] == "[gpu]"
    assert "gpu-worker" not in compose_config().stdout  # only with --profile gpu
