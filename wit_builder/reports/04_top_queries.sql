-- The queries with the most pairs, before and after balancing.
WITH per_query AS (
    SELECT id, count(*) AS matched, count(*) FILTER (WHERE keep) AS kept
    FROM (SELECT unnest(query_ids) AS id, keep FROM balanced)
    GROUP BY id ORDER BY matched DESC, id LIMIT 15)
SELECT q.query, p.matched, p.kept
FROM per_query p JOIN queries q ON q.query_id = p.id
ORDER BY p.matched DESC, q.query
