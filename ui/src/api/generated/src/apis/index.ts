/* tslint:disable */
/* eslint-disable */
export * from './AdminApi';
export * from './AllocationsApi';
export * from './AuditApi';
export * from './AuthApi';
export * from './BillingApi';
export * from './HealthApi';
export * from './InventoryApi';
export * from './MembersApi';
export * from './NodesApi';
export * from './PaymentsApi';
export * from './ProjectsApi';
export * from './ServiceAccountsApi';
