-- Query coverage: how many queries have at least one pair, before and after balancing.
SELECT (SELECT count(*) FROM queries) AS queries,
       (SELECT count(DISTINCT q) FROM (SELECT unnest(query_ids) AS q FROM matched)) AS with_matched_pairs,
       (SELECT count(DISTINCT q) FROM (SELECT unnest(query_ids) AS q FROM balanced)) AS with_survivors,
       (SELECT count(DISTINCT q) FROM (SELECT unnest(query_ids) AS q FROM balanced WHERE keep)) AS after_balancing
