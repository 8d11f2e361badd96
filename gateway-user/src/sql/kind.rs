//! The kind of a statement, in the words policies use.

use pg_query::NodeEnum;

/// Classifies a top-level statement node. The names are the vocabulary of
/// policy rules and audit records: select, insert, update, delete, merge,
/// copy, ddl, utility, transaction, set, show, explain, prepare, execute,
/// cursor, listen, notify, call, do, role, lock, maintenance, ...
pub fn statement_kind(node: &NodeEnum) -> &'static str {
    use NodeEnum as N;
    match node {
        N::SelectStmt(s) if s.into_clause.is_some() => "select_into",
        N::SelectStmt(_) => "select",
        N::InsertStmt(_) => "insert",
        N::UpdateStmt(_) => "update",
        N::DeleteStmt(_) => "delete",
        N::MergeStmt(_) => "merge",
        N::CopyStmt(c) if c.is_from => "copy_in",
        N::CopyStmt(_) => "copy_out",
        N::TransactionStmt(_) => "transaction",
        N::VariableSetStmt(_) => "set",
        N::VariableShowStmt(_) => "show",
        N::ExplainStmt(_) => "explain",
        N::PrepareStmt(_) => "prepare",
        N::ExecuteStmt(_) => "execute",
        N::DeallocateStmt(_) => "deallocate",
        N::DeclareCursorStmt(_) | N::FetchStmt(_) | N::ClosePortalStmt(_) => "cursor",
        N::ListenStmt(_) | N::UnlistenStmt(_) => "listen",
        N::NotifyStmt(_) => "notify",
        N::CallStmt(_) => "call",
        N::DoStmt(_) => "do",
        N::LockStmt(_) => "lock",
        N::VacuumStmt(_) | N::ClusterStmt(_) | N::ReindexStmt(_) | N::CheckPointStmt(_) => {
            "maintenance"
        }
        N::AlterSystemStmt(_) => "alter_system",
        N::LoadStmt(_) => "load",
        N::CreateRoleStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterRoleSetStmt(_)
        | N::DropRoleStmt(_)
        | N::GrantStmt(_)
        | N::GrantRoleStmt(_)
        | N::AlterDefaultPrivilegesStmt(_)
        | N::ReassignOwnedStmt(_)
        | N::DropOwnedStmt(_) => "privilege",
        N::DiscardStmt(_) | N::ConstraintsSetStmt(_) => "session",
        N::CreateStmt(_)
        | N::CreateTableAsStmt(_)
        | N::AlterTableStmt(_)
        | N::DropStmt(_)
        | N::TruncateStmt(_)
        | N::CommentStmt(_)
        | N::IndexStmt(_)
        | N::ViewStmt(_)
        | N::RuleStmt(_)
        | N::CreateTrigStmt(_)
        | N::CreateFunctionStmt(_)
        | N::AlterFunctionStmt(_)
        | N::CreateExtensionStmt(_)
        | N::AlterExtensionStmt(_)
        | N::CreateSchemaStmt(_)
        | N::CreateSeqStmt(_)
        | N::AlterSeqStmt(_)
        | N::RenameStmt(_)
        | N::AlterObjectSchemaStmt(_)
        | N::AlterOwnerStmt(_)
        | N::DefineStmt(_)
        | N::CompositeTypeStmt(_)
        | N::CreateEnumStmt(_)
        | N::CreateDomainStmt(_)
        | N::AlterDomainStmt(_)
        | N::CreatePolicyStmt(_)
        | N::AlterPolicyStmt(_)
        | N::CreatedbStmt(_)
        | N::DropdbStmt(_)
        | N::AlterDatabaseStmt(_)
        | N::CreateTableSpaceStmt(_)
        | N::DropTableSpaceStmt(_)
        | N::SecLabelStmt(_)
        | N::RefreshMatViewStmt(_)
        | N::CreateEventTrigStmt(_)
        | N::CreatePublicationStmt(_)
        | N::CreateSubscriptionStmt(_)
        | N::CreateForeignTableStmt(_)
        | N::CreateFdwStmt(_)
        | N::CreateForeignServerStmt(_)
        | N::CreateUserMappingStmt(_)
        | N::ImportForeignSchemaStmt(_)
        | N::CreateCastStmt(_)
        | N::CreateOpClassStmt(_)
        | N::CreateConversionStmt(_)
        | N::CreateTransformStmt(_)
        | N::CreateStatsStmt(_)
        | N::CreatePlangStmt(_)
        | N::CreateAmStmt(_) => "ddl",
        _ => "utility",
    }
}
