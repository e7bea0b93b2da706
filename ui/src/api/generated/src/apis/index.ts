/* tslint:disable */
/* eslint-disable */
export * from './AllocationsApi';
export * from './AuthApi';
export * from './HealthApi';
export * from './InventoryApi';
export * from './NodesApi';
export * from './ProjectsApi';
