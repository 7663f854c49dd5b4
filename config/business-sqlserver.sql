-- The example business tables on SQL Server (the same as config/business.sql
-- for PostgreSQL), for the optional SQL Server site of docker-compose.yml.
-- An application writes a change and its outbox row in one transaction:
--
--   BEGIN TRANSACTION;
--   MERGE dbo.customer WITH (HOLDLOCK) AS t USING (SELECT 7 AS id) AS s ON t.id = s.id
--     WHEN MATCHED THEN UPDATE SET name = N'Zoé', city = N'Madrid', updated_at = SYSDATETIMEOFFSET()
--     WHEN NOT MATCHED THEN INSERT (id, name, city, updated_at) VALUES (7, N'Zoé', N'Madrid', SYSDATETIMEOFFSET());
--   INSERT INTO dbo.outbox (type, entity_key, data)
--     VALUES (N'customer.upsert', N'7', N'{"id": 7, "name": "Zoé", "city": "Madrid", "updated_at": "2026-11-23T10:00:00Z"}');
--   COMMIT;
IF DB_ID(N'madrid') IS NULL CREATE DATABASE madrid;
GO
USE madrid;
GO
IF OBJECT_ID(N'dbo.customer', N'U') IS NULL CREATE TABLE dbo.customer (
    id int PRIMARY KEY,
    name nvarchar(200) NOT NULL,
    city nvarchar(200) NULL,
    updated_at datetimeoffset(6) NOT NULL
);
IF OBJECT_ID(N'dbo.orders', N'U') IS NULL CREATE TABLE dbo.orders (
    id int PRIMARY KEY,
    customer_id int NOT NULL,
    amount decimal(10,2) NOT NULL,
    status nvarchar(50) NOT NULL
);
GO
