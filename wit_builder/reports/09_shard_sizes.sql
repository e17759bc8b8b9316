-- Shards: samples and bytes each.
SELECT shard, count(*) AS samples, round(sum(bytes) / 1048576.0, 2) AS image_mib
FROM shards GROUP BY shard ORDER BY shard
