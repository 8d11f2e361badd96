-- Extra objects for masking cases beyond the shared corpus: views,
-- partitions, inheritance. Loaded after ../corpus/fixture.sql.
CREATE VIEW customer_contacts AS SELECT id, name, email AS contact, upper(phone) AS phone_u FROM customers;
CREATE VIEW contacts_again AS SELECT * FROM customer_contacts;
CREATE TABLE people (id int, email text, region text) PARTITION BY LIST (region);
CREATE TABLE people_eu PARTITION OF people FOR VALUES IN ('eu');
INSERT INTO people VALUES (1, (SELECT email FROM customers WHERE id = 1), 'eu');
CREATE TABLE archived_customers () INHERITS (customers);
INSERT INTO archived_customers SELECT id + 100, name, email, ssn, card, phone, tier FROM customers WHERE id = 2;
