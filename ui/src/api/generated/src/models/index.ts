/* tslint:disable */
/* eslint-disable */
export * from './AllocationState';
export * from './AllocationView';
export * from './AuditEntryView';
export * from './EnrolRequest';
export * from './EnrolResponse';
export * from './ErrorBody';
export * from './FieldError';
export * from './FlavorList';
export * from './FlavorView';
export * from './HealthView';
export * from './HostCapacity';
export * from './LoginRequest';
export * from './NewAllocation';
export * from './PaginatedAllocationView';
export * from './PaginatedAllocationViewItemsInner';
export * from './PaginatedAuditEntryView';
export * from './PaginatedAuditEntryViewItemsInner';
export * from './PaginatedProjectView';
export * from './PaginatedProjectViewItemsInner';
export * from './ProjectRequest';
export * from './ProjectView';
export * from './RegisterRequest';
export * from './RegisterResponse';
export * from './TaskSigningKeyView';
export * from './TokenResponse';
