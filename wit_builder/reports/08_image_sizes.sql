-- Stored image sizes (successful downloads).
SELECT count(*) AS images, min(width) AS min_w, median(width) AS median_w, max(width) AS max_w,
       min(height) AS min_h, median(height) AS median_h, max(height) AS max_h,
       round(avg(bytes) / 1024, 1) AS mean_kib
FROM downloads WHERE status = 'success'
