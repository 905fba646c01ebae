-- The Prefect server's database, beside MLflow's (POSTGRES_DB); run once, on the first start.
CREATE DATABASE prefect;
