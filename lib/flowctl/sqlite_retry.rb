# frozen_string_literal: true

module Flowctl
  # Stores that share the control plane's SQLite file (WAL, its writer thread): a statement that
  # still finds the file busy after busy_timeout is tried again a few times, then raises.
  module SQLiteRetry
    ATTEMPTS = 3

    def self.execute(db, statement, binds)
      attempts = 0
      begin
        db.execute(statement, binds)
      rescue ::SQLite3::BusyException, ::SQLite3::LockedException
        attempts += 1
        raise if attempts > ATTEMPTS

        sleep 0.05 * attempts
        retry
      end
    end
  end
end
