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


def test_shop_profile_counts_into_postgres_and_serves_the_dashboard_on_this_host():
    import yaml

    res = compose_config(profiles="shop")
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    count, dashboard = services["count"], services["dashboard"]
    url = count["environment"]["KFACE_STORE_URL"].replace("$$", "$")  # (escaped)
    # kface reads the password from the environment: the URL holds its name, not it
    assert url.startswith("postgresql://prefect:${KFACE_STORE_PASSWORD}@postgres:5432/")
    assert dashboard["environment"]["KFACE_STORE_URL"].replace("$$", "$") == url
    assert dashboard["ports"][0]["host_ip"] == "127.0.0.1"
    assert count["command"][:2] == ["kface", "count"]
    assert "count" not in yaml.safe_load(compose_config().stdout)["services"]
