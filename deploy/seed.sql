-- Jobs for the local fleet (deploy/compose.yaml): 10,000 per provider, each payload the
-- provider's own request body, as a producer would insert them. Run by the `seed` service:
--
--     docker compose -f deploy/compose.yaml --profile seed run --rm seed
--
-- Running it again adds nothing: each job has an idempotency key and the insert skips
-- conflicts. Change the batch_id prefix below to enqueue a fresh run.

INSERT INTO link_jobs (provider, account, payload, idempotency_key, batch_id)
SELECT 'billpocket', 'default',
       jsonb_build_object(
           'expired_at', '2030-05-22T15:20:34',
           'amount', 150 + (n % 50) * 10,
           'type', 2,
           'description', 'Factura ' || (100000 + n),
           'rates', jsonb_build_array(jsonb_build_object('months', '3', 'type', 'MSI')),
           'is_fixed_term', false),
       'fleet-bp-' || n, 'fleet-billpocket'
  FROM generate_series(1, 10000) AS n
ON CONFLICT (provider, account, idempotency_key) DO NOTHING;

INSERT INTO link_jobs (provider, account, payload, idempotency_key, batch_id)
SELECT 'cheqpay', 'default',
       jsonb_build_object(
           'products', jsonb_build_array(jsonb_build_object(
               'id', 'sku-' || (n % 7), 'name', 'Suscripción mensual', 'qty', 1,
               'price', 1000 + (n % 90) * 100, 'total', 1000 + (n % 90) * 100)),
           'totals', jsonb_build_object(
               'total', 1000 + (n % 90) * 100, 'taxes', 0, 'shipping', 0, 'fees', 0,
               'discounts', 0),
           'paymentMethods', jsonb_build_array('CARD'),
           'currency', 'MXN',
           'redirectUrl', 'https://shop.example.mx/gracias',
           'metadata', jsonb_build_object('invoice', 'F-' || (200000 + n))),
       'fleet-cq-' || n, 'fleet-cheqpay'
  FROM generate_series(1, 10000) AS n
ON CONFLICT (provider, account, idempotency_key) DO NOTHING;

INSERT INTO link_jobs (provider, account, payload, idempotency_key, batch_id)
SELECT 'kushki', 'default',
       jsonb_build_object(
           'merchantName', 'Merchant CL',
           'paymentConfig', jsonb_build_object(
               'paymentType', 'unique',
               'amount', jsonb_build_object(
                   'currency', 'CLP', 'subtotalIva', 0,
                   'subtotalIva0', (ARRAY[15000, 24990, 49990])[1 + n % 3], 'iva', 0),
               'paymentMethod', jsonb_build_array('credit-card')),
           'generalConfig', jsonb_build_object(
               'productName', 'Plan ' || (ARRAY['Starter', 'Hogar', 'Pro'])[1 + n % 3] || ' #' || n,
               'description', '<p>Cobertura completa</p>',
               'productImage',
               'https://kushki-static.s3.amazonaws.com/smartlinks/product-image.png',
               'brandLogo', 'https://kushki-static.s3.amazonaws.com/smartlinks/logo.png',
               'executionLimit', 1,
               'showTimer', false,
               'enabled', true,
               'termsAndConditions', ''),
           'styleAndStructure', jsonb_build_object('structure', 'checkout'),
           'contact', jsonb_build_object('email', 'soporte@example.cl', 'phoneNumber', '988238833'),
           'formConfig', jsonb_build_array(jsonb_build_object(
               'label', 'E-mail', 'type', 'input', 'split', false, 'required', true,
               'disabled', false, 'name', 'email', 'placeholder', 'E-mail', 'value', ''))),
       'fleet-ku-' || n, 'fleet-kushki'
  FROM generate_series(1, 10000) AS n
ON CONFLICT (provider, account, idempotency_key) DO NOTHING;

SELECT provider, count(*) AS pending
  FROM link_jobs WHERE state = 'pending' GROUP BY provider ORDER BY provider;
