"""The broker's Redis as the pending marks and the merge slots reach it (gateway/broker_redis.py)."""

from gateway import broker_redis
from gateway.merge.parallel import _slot_client, slots_supported


def test_only_a_redis_broker_is_used_and_kombus_unix_url_becomes_redis_pys():
    assert broker_redis.url_of("redis://127.0.0.1:6379/3") == "redis://127.0.0.1:6379/3"
    assert broker_redis.url_of("amqp://guest@127.0.0.1//") is None
    assert broker_redis.url_of(None) is None
    assert not slots_supported("sqla+sqlite:////tmp/broker.sqlite3")
    # kombu names a socket redis+unix://, which redis-py does not parse: the merge slots' client
    # used to be made from it as it was, and every announcement failed on such a broker
    unix = _slot_client("redis+unix:///run/redis/redis.sock")
    assert unix.connection_pool.connection_kwargs["path"] == "/run/redis/redis.sock"
    same = "redis://127.0.0.1:6379/3"
    assert broker_redis.client(same, 2) is broker_redis.client(same, 2)
