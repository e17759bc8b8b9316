-- Dedup: how many were removed, and why.
SELECT coalesce(reason, 'kept') AS outcome, count(*) AS images,
       round(100.0 * count(*) / sum(count(*)) OVER (), 1) AS percent
FROM dedup GROUP BY 1 ORDER BY images DESC
