-- The queries with the fewest pairs (of those with any), by source.
WITH per_query AS (
    SELECT id, count(*) AS matched FROM (SELECT unnest(query_ids) AS id FROM matched)
    GROUP BY id ORDER BY matched, id LIMIT 15)
SELECT q.query, q.sources, p.matched
FROM per_query p JOIN queries q ON q.query_id = p.id
ORDER BY p.matched, q.query
