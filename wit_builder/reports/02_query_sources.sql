-- Entries per query source (an entry may have several sources).
SELECT s AS source, count(*) AS entries FROM (SELECT unnest(sources) AS s FROM queries)
GROUP BY s ORDER BY entries DESC
