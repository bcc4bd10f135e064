# frozen_string_literal: true

require "json"
require_relative "schema"
require_relative "../sqlite_retry"

module Flowctl
  module Config
    # Versioned configuration per component: the schema it declared, every version
    # (values, time, author, comment), kept forever (history), rollback to any version (a
    # new version with its values). Thread-safe; #wait_for lets a watcher sleep until a
    # version after the one it has. In memory, or in SQLite when path is given (tables
    # config_schemas and config_versions, in the control plane's file).
    #
    #   store = Flowctl::Config::Store.new("flowctl.db")
    #   store.declare("sq", Schema.new("rate" => {type: :integer, default: 10}))  # version 1 from the defaults
    #   store.update("sq", {"rate" => 20}, author: "ops")                         # version 2
    #   store.rollback("sq", 1)                                                    # version 3 = version 1's values
    class Store
      Version = Struct.new(:component_id, :version, :values, :created_at, :author, :comment, keyword_init: true)

      def initialize(path = nil)
        @lock = Mutex.new
        @changed = ConditionVariable.new
        @schemas = {}
        @versions = Hash.new { |h, k| h[k] = [] }
        @db = path && open_db(path)
        load_db if @db
      end

      def schema(id) = @lock.synchronize { @schemas[id] }

      # Records the component's schema. The current version must fit it (else
      # InvalidArgument naming the key); with no version yet, version 1 holds its defaults
      # (when it has any). Returns the current Version (nil when none).
      def declare(id, schema)
        check_id(id)
        @lock.synchronize do
          current = @versions[id].last
          schema.validate(current.values) if current
          @schemas[id] = schema
          persist_schema(id, schema)
          append(id, schema.defaults, "schema defaults", "") if current.nil? && !schema.defaults.empty?
          @versions[id].last
        end
      end

      # A new version: values replace the current ones (merge: true merges them in),
      # validated against the schema when one is declared. Returns the new Version.
      def update(id, values, merge: false, author: "", comment: "")
        check_id(id)
        raise InvalidArgument, "config values must be a Hash (given #{values.class})" unless values.is_a?(Hash)

        values = values.transform_keys(&:to_s)
        @lock.synchronize do
          base = merge ? (@versions[id].last&.values || {}) : {}
          merged = base.merge(values)
          @schemas[id]&.validate(merged)
          append(id, merged, author, comment)
        end
      end

      # A new version with the values of version n (validated against today's schema).
      def rollback(id, version, author: "")
        old = get(id, version) or raise NotFound, "component #{id.inspect} has no config version #{version}"
        update(id, old.values, author: author, comment: "rollback to version #{version}")
      end

      # Version n (0 or nil: the current one), or nil.
      def get(id, version = nil)
        @lock.synchronize do
          list = @versions.fetch(id, [])
          version.nil? || version.zero? ? list.last : list.find { |v| v.version == version }
        end
      end

      def history(id) = @lock.synchronize { @versions.fetch(id, []).dup }

      # Waits (at most timeout seconds) for a version of id after `after`; returns it or nil.
      def wait_for(id, after, timeout)
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
        @lock.synchronize do
          loop do
            v = @versions.fetch(id, []).find { |x| x.version > after }
            return v if v

            left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
            return nil if left <= 0

            @changed.wait(@lock, left)
          end
        end
      end

      # Wakes every watcher (at shutdown).
      def wake_all = @lock.synchronize { @changed.broadcast }

      def close
        @lock.synchronize { @db&.close unless @db&.closed? }
      end

      private

      def check_id(id)
        raise InvalidArgument, "component_id is required" if !id.is_a?(String) || id.empty?
      end

      # under @lock
      def append(id, values, author, comment)
        v = Version.new(component_id: id, version: (@versions[id].last&.version || 0) + 1, values: values.freeze,
                        created_at: Time.now, author: author.to_s, comment: comment.to_s).freeze
        persist_version(v)
        @versions[id] << v
        @changed.broadcast
        v
      end

      SCHEMA_SQL = [
        "CREATE TABLE IF NOT EXISTS config_schemas (component_id TEXT PRIMARY KEY, schema TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS config_versions (component_id TEXT NOT NULL, version INTEGER NOT NULL, " \
        "config TEXT NOT NULL, created_at REAL NOT NULL, author TEXT, comment TEXT, PRIMARY KEY (component_id, version))"
      ].freeze

      def open_db(path)
        require "sqlite3"
        db = ::SQLite3::Database.new(File.expand_path(path))
        db.busy_timeout = 5000
        SCHEMA_SQL.each { |s| db.execute(s) }
        db
      rescue ::SQLite3::Exception => e
        raise Flowctl::Error, "config store #{path}: #{e.message}"
      end

      def load_db
        @db.execute("SELECT component_id, schema FROM config_schemas").each do |id, json|
          @schemas[id] = Schema.from_h(JSON.parse(json))
        end
        @db.execute("SELECT component_id, version, config, created_at, author, comment FROM config_versions " \
                    "ORDER BY component_id, version").each do |id, n, json, at, author, comment|
          @versions[id] << Version.new(component_id: id, version: n, values: JSON.parse(json).freeze, created_at: Time.at(at),
                                       author: author.to_s, comment: comment.to_s).freeze
        end
      end

      def persist_schema(id, schema)
        write("INSERT OR REPLACE INTO config_schemas (component_id, schema) VALUES (?, ?)", [id, JSON.generate(schema.to_h)])
      end

      def persist_version(v)
        write("INSERT INTO config_versions (component_id, version, config, created_at, author, comment) " \
              "VALUES (?, ?, ?, ?, ?, ?)", [v.component_id, v.version, JSON.generate(v.values), v.created_at.to_f,
                                             v.author, v.comment])
      end

      # The file is shared with the control plane's own tables (SQLiteRetry).
      def write(statement, binds)
        return unless @db

        SQLiteRetry.execute(@db, statement, binds)
      rescue ::SQLite3::Exception => e
        raise Flowctl::Error, "config store: #{e.class}: #{e.message}"
      end
    end
  end
end
