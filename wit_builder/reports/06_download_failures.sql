-- Download failures by reason and by domain.
SELECT status, reason, regexp_extract(url, '^[a-z]+://([^/:]+)', 1) AS domain, count(*) AS samples
FROM downloads WHERE status != 'success'
GROUP BY ALL ORDER BY samples DESC LIMIT 20
